from django.core.management.base import BaseCommand, CommandError

from appliance.actions import do_start_import
from appliance.models import ModelVariant, VariantKind, VariantStatus

from ._common import cli_actor, refusals_as_errors, wait_for


class Command(BaseCommand):
    help = "Import a model directory from a local path (USB disk, NFS mount) through the worker."

    def add_arguments(self, parser):
        parser.add_argument("path")
        parser.add_argument("--name", required=True)
        parser.add_argument("--kind", required=True, choices=VariantKind.values)
        parser.add_argument("--wait", action="store_true", help="wait until the worker has finished")
        parser.add_argument("--timeout", type=float, default=600)

    def handle(self, path, name, kind, wait, timeout, **options):
        with refusals_as_errors():
            variant = do_start_import(name=name, kind=kind, source_path=path, actor=cli_actor())
        self.stdout.write(f"import of {name} queued from {variant.source_path}")
        if not wait:
            return

        def finished():
            v = ModelVariant.objects.get(pk=variant.pk)
            return v if v.status != VariantStatus.IMPORTING else None

        variant = wait_for(finished, timeout=timeout, what=f"the worker to import {name} (is a worker running?)")
        if variant.status != VariantStatus.READY:
            raise CommandError(f"import of {name} {variant.status}: {variant.status_detail}")
        self.stdout.write(f"{name} ready: {variant.params_total:,} parameters, "
                          f"{variant.size_bytes / 1e6:.1f} MB, {len(variant.manifest)} files hashed")
