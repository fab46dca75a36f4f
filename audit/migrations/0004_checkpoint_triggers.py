"""Make the database refuse UPDATE, DELETE and TRUNCATE on the checkpoint table, as on the ledger.

Same rules and the same caveat as 0002: a guard against accidents and casual edits; signatures
and consistency checks are what make a determined edit evident.
"""
from django.db import migrations

SQLITE_TRIGGERS = {"audit_checkpoint_no_update": "UPDATE", "audit_checkpoint_no_delete": "DELETE"}

POSTGRESQL_FUNCTION = """
CREATE OR REPLACE FUNCTION audit_checkpoint_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' AND NOT EXISTS (SELECT 1 FROM {table}) THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'restrict_violation',
        MESSAGE = 'audit checkpoints are append-only: ' || TG_OP || ' refused';
END;
$$
"""
POSTGRESQL_TRIGGERS = {
    "audit_checkpoint_no_change": "BEFORE UPDATE OR DELETE ON {table} FOR EACH ROW",
    "audit_checkpoint_no_truncate": "BEFORE TRUNCATE ON {table} FOR EACH STATEMENT",
}


def create_triggers(apps, schema_editor):
    """Create the append-only triggers for the connection's database."""
    table = schema_editor.quote_name(apps.get_model("audit", "Checkpoint")._meta.db_table)
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        for name, operation in SQLITE_TRIGGERS.items():
            schema_editor.execute(
                f"CREATE TRIGGER {name} BEFORE {operation} ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END",
                params=None,
            )
    elif vendor == "postgresql":
        schema_editor.execute(POSTGRESQL_FUNCTION.format(table=table), params=None)
        for name, when in POSTGRESQL_TRIGGERS.items():
            schema_editor.execute(
                f"CREATE TRIGGER {name} {when.format(table=table)} "
                "EXECUTE FUNCTION audit_checkpoint_refuse_change()",
                params=None,
            )
    else:
        raise NotImplementedError(f"no append-only triggers for {vendor}")


def drop_triggers(apps, schema_editor):
    """Drop the triggers, so the table can be dropped when unmigrating."""
    table = schema_editor.quote_name(apps.get_model("audit", "Checkpoint")._meta.db_table)
    if schema_editor.connection.vendor == "sqlite":
        for name in SQLITE_TRIGGERS:
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {name}", params=None)
    else:
        for name in POSTGRESQL_TRIGGERS:
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}", params=None)
        schema_editor.execute("DROP FUNCTION IF EXISTS audit_checkpoint_refuse_change()", params=None)


class Migration(migrations.Migration):
    dependencies = [("audit", "0003_evidence")]

    operations = [migrations.RunPython(create_triggers, drop_triggers)]
