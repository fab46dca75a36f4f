"""Make the database itself refuse UPDATE, DELETE and TRUNCATE on the ledger.

The ORM already refuses; these triggers also stop raw SQL and other clients.
They are a guard against accidents and casual edits, not against the database
owner, who can drop them: the hash chain is what makes such edits evident.

On SQLite, a later migration that alters this table rebuilds it (new table,
copy, drop, rename) and the triggers go with the old table: such a migration
must run create_triggers again. tests/audit checks that they are in place.
"""
from django.db import migrations

SQLITE_TRIGGERS = {
    "audit_event_no_update": "UPDATE",
    "audit_event_no_delete": "DELETE",
}

# A row trigger for UPDATE and DELETE, and a statement trigger for TRUNCATE,
# which fires no row triggers. An empty ledger may still be truncated: nothing
# is lost, and Django's test flush truncates every table (SQLite's flush
# deletes rows, which fires no row trigger on an empty table either).
POSTGRESQL_FUNCTION = """
CREATE OR REPLACE FUNCTION audit_event_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' AND NOT EXISTS (SELECT 1 FROM {table}) THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'restrict_violation',
        MESSAGE = 'audit ledger is append-only: ' || TG_OP || ' refused';
END;
$$
"""
POSTGRESQL_TRIGGERS = {
    "audit_event_no_change": "BEFORE UPDATE OR DELETE ON {table} FOR EACH ROW",
    "audit_event_no_truncate": "BEFORE TRUNCATE ON {table} FOR EACH STATEMENT",
}


def create_triggers(apps, schema_editor):
    """Create the append-only triggers for the connection's database."""
    table = _table(apps, schema_editor)
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        for name, operation in SQLITE_TRIGGERS.items():
            schema_editor.execute(
                f"CREATE TRIGGER {name} BEFORE {operation} ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'audit ledger is append-only'); END",
                params=None,
            )
    elif vendor == "postgresql":
        # params=None: the SQL goes to the server as written, with no placeholder parsing.
        schema_editor.execute(POSTGRESQL_FUNCTION.format(table=table), params=None)
        for name, when in POSTGRESQL_TRIGGERS.items():
            schema_editor.execute(
                f"CREATE TRIGGER {name} {when.format(table=table)} "
                "EXECUTE FUNCTION audit_event_refuse_change()",
                params=None,
            )
    else:
        raise NotImplementedError(f"no append-only triggers for {vendor}")


def drop_triggers(apps, schema_editor):
    """Drop the append-only triggers, so the table can be dropped when unmigrating."""
    table = _table(apps, schema_editor)
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        for name in SQLITE_TRIGGERS:
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {name}", params=None)
    elif vendor == "postgresql":
        for name in POSTGRESQL_TRIGGERS:
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}", params=None)
        schema_editor.execute("DROP FUNCTION IF EXISTS audit_event_refuse_change()", params=None)


def _table(apps, schema_editor) -> str:
    """Return the quoted name of the ledger table."""
    model = apps.get_model("audit", "AuditEvent")
    return schema_editor.quote_name(model._meta.db_table)


class Migration(migrations.Migration):
    dependencies = [("audit", "0001_initial")]

    operations = [migrations.RunPython(create_triggers, drop_triggers)]
