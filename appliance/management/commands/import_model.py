import sys

from django.core.management.base import BaseCommand, CommandError

from appliance import ollama
from appliance.actions import do_start_import
from appliance.modelfiles import InvalidModelDir
from appliance.models import ModelVariant, Relation, VariantKind, VariantStatus
from appliance.names import InvalidName
from appliance.provenance import InvalidParent, parse_parent

from ._common import cli_actor, refusals_as_errors, wait_for


class Command(BaseCommand):
    help = ("Import a model through the worker: a Hugging Face directory or a GGUF file from a local path "
            "(USB disk, NFS mount), or a model from an Ollama models directory.")

    def add_arguments(self, parser):
        parser.add_argument("path", nargs="?", help="a model directory or a .gguf file")
        parser.add_argument("--from-ollama", metavar="NAME:TAG",
                            help="import this model from Ollama's models directory (OLLAMA_MODELS or ~/.ollama/models)")
        parser.add_argument("--name", required=True)
        parser.add_argument("--kind", required=True, choices=VariantKind.values)
        parser.add_argument("--parent", action="append", default=[], metavar="NAME:RELATION",
                            help=f"a registered variant this one descends from; relation one of "
                                 f"{', '.join(Relation.values)} (repeatable)")
        parser.add_argument("--license", help="the license, when the files do not state it")
        parser.add_argument("--upstream", metavar="OWNER/REPO", help="the upstream repository, e.g. on Hugging Face")
        parser.add_argument("--revision", help="the upstream revision (commit) the files are from")
        parser.add_argument("--node", help="the node whose worker imports it: the box that can read PATH "
                                           "(default: this one)")
        parser.add_argument("--wait", action="store_true", help="wait until the worker has finished")
        parser.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")
        parser.add_argument("--timeout", type=float, default=3600)

    def handle(self, path, from_ollama, name, kind, parent, license, upstream, revision, node, wait, no_progress,
               timeout, **options):
        if bool(path) == bool(from_ollama):
            raise CommandError("give either PATH or --from-ollama NAME:TAG")
        if from_ollama and node:
            raise CommandError("--from-ollama reads this box's Ollama models; run it on the node that has them")
        provenance = {}
        try:
            parents = [parse_parent(spec) for spec in parent]
            if from_ollama:
                blob, provenance = ollama.resolve(from_ollama)
                path = str(blob)
        except (InvalidParent, InvalidName, InvalidModelDir) as exc:
            raise CommandError(str(exc)) from exc
        if license:
            provenance["license"] = license
        if upstream or revision:
            provenance["upstream"] = {k: v for k, v in (("repository", upstream), ("revision", revision)) if v}
        with refusals_as_errors():
            variant = do_start_import(name=name, kind=kind, source_path=path, actor=cli_actor(),
                                      provenance=provenance, parents=parents, node=node)
        self.stdout.write(f"import of {name} queued from {variant.source_path}")
        if not wait:
            return
        variant = self.wait_with_progress(variant, timeout, show=not no_progress and sys.stderr.isatty())
        if variant.status != VariantStatus.READY:
            raise CommandError(f"import of {name} {variant.status}: {variant.status_detail}")
        self.stdout.write(f"{name} ready: {variant.params_total:,} parameters, "
                          f"{variant.size_bytes / 1e6:.1f} MB, {len(variant.manifest)} files hashed")

    def wait_with_progress(self, variant, timeout: float, *, show: bool):
        """Wait for the worker, drawing its progress (phase, bytes done and rate) as a bar on a terminal."""
        from tqdm import tqdm  # here: only --wait draws a bar; every other use of the command does without it

        bar = tqdm(total=100, unit="%", desc=variant.name, disable=not show, file=sys.stderr,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

        def finished():
            v = ModelVariant.objects.get(pk=variant.pk)
            bar.update(max(0, v.progress - bar.n))
            bar.set_postfix_str(v.progress_detail, refresh=True)
            return v if v.status != VariantStatus.IMPORTING else None

        try:
            return wait_for(finished, timeout=timeout, what=f"the worker to import {variant.name} "
                                                            "(is a worker running?)", interval=0.5)
        finally:
            bar.close()
