"""The console: the Django admin, with lifecycle actions that go through appliance.actions."""
import base64
import functools
from pathlib import Path

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from . import actions, fitting, lineage, ollama, placement
from .console.charts import expert_heatmap
from .templatetags.humanize_fit import count
from .actions import do_update_api_key, do_update_team
from .modelfiles import InvalidModelDir, OutsideStore, validate_gguf_file
from .models import ApiKey, Deployment, Engine, ModelVariant, Node, NodeCopy, Relation, Team
from .names import InvalidName

admin.site.site_header = "LLM appliance console"
admin.site.site_title = "LLM appliance"
admin.site.index_title = "Registry, teams and audit"

STATUS_COLOURS = {"importing": "#b58900", "ready": "#268bd2", "deployed": "#2aa198",
                  "failed": "#dc322f", "quarantined": "#d33682"}


def actor_of(request) -> str:
    return f"admin:{request.user.get_username()}"


class ImportForm(forms.ModelForm):
    """Import a directory or a GGUF file from a local path, or a model from Ollama's models directory."""

    ollama_ref = forms.CharField(
        required=False, label="or an Ollama model",
        help_text="NAME:TAG as `ollama list` shows it (e.g. llama3.2:1b), read from OLLAMA_MODELS or "
                  "~/.ollama/models; leave the path empty.")
    parent = forms.ModelChoiceField(queryset=ModelVariant.objects.all(), required=False, to_field_name="name",
                                    help_text="A registered variant this one descends from.")
    relation = forms.ChoiceField(choices=[("", "—"), *Relation.choices], required=False)
    license = forms.CharField(required=False, max_length=100, help_text="When the files do not state it.")
    upstream = forms.CharField(required=False, max_length=200, label="upstream repository",
                               help_text="e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    revision = forms.CharField(required=False, max_length=100, label="upstream revision")
    node = forms.ChoiceField(required=False, label="imported by node",
                             help_text="The box that can read the path: its worker copies and hashes the files, and "
                                       "its copy is the variant's first.")

    class Meta:
        model = ModelVariant
        fields = ["name", "kind", "source_path"]
        help_texts = {"source_path": "A directory on this box (USB disk, NFS mount) holding config.json and "
                                     "*.safetensors weights, or a .gguf file (llama.cpp, Ollama). The worker copies "
                                     "and hashes a directory; it hashes a GGUF and converts it to safetensors."}

    EXTRA = ["ollama_ref", "parent", "relation", "license", "upstream", "revision", "node"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["source_path"].required = False
        here = settings.APPLIANCE_NODE
        self.fields["node"].choices = [(here, f"{here} (this node)"), *(
            (name, name) for name in Node.objects.exclude(name=here).values_list("name", flat=True))]
        self.provenance: dict = {}

    def on_another_node(self) -> bool:
        return self.data.get("node", "") not in ("", settings.APPLIANCE_NODE)

    def clean_node(self):
        try:
            actions.importing_node(self.cleaned_data["node"])
        except actions.ActionRefused as exc:
            raise forms.ValidationError(str(exc)) from None
        return self.cleaned_data["node"]

    def clean_source_path(self):
        path = self.cleaned_data["source_path"]
        if not path:
            return path
        if self.on_another_node():  # a path on that box: its worker checks it, as this one checks its own
            if not Path(path).is_absolute():
                raise forms.ValidationError("give the path on that node as an absolute path")
            return path
        where = Path(path).expanduser()
        if where.is_dir():
            return path
        if where.is_file():
            try:
                validate_gguf_file(where.resolve())
            except InvalidModelDir as exc:
                raise forms.ValidationError(str(exc)) from None
            return path
        raise forms.ValidationError(f"{path} is not a directory or a GGUF file on this box")

    def clean(self):
        data = super().clean()
        ref, path = data.get("ollama_ref"), data.get("source_path")
        if ref and path:
            raise forms.ValidationError("give a path or an Ollama model, not both")
        if ref and self.on_another_node():
            raise forms.ValidationError("an Ollama model is read from this box's Ollama models: import it on the "
                                        "node that has them")
        if ref:
            try:
                blob, self.provenance = ollama.resolve(ref)
            except (InvalidName, InvalidModelDir) as exc:
                self.add_error("ollama_ref", str(exc))
            else:
                data["source_path"] = str(blob)
        elif not path and "source_path" not in self.errors:
            self.add_error("source_path", "give a path on this box, or an Ollama model")
        if bool(data.get("parent")) != bool(data.get("relation")):
            self.add_error("relation", "a parent needs a relation, and a relation a parent")
        for field in ("license",):
            if data.get(field):
                self.provenance[field] = data[field]
        upstream = {k: data[f] for k, f in (("repository", "upstream"), ("revision", "revision")) if data.get(f)}
        if upstream:
            self.provenance["upstream"] = upstream
        return data

    def parents(self) -> list[dict]:
        parent = self.cleaned_data.get("parent")
        return [{"name": parent.name, "relation": self.cleaned_data["relation"]}] if parent else []


def deploy_on(engine: str, label: str):
    """Return the console action that deploys the selected variants on `engine`, through do_deploy like any deploy
    (the engine is never a form field: a form would write the deployment row itself)."""

    def action(modeladmin, request, queryset):
        modeladmin._each(request, queryset, functools.partial(actions.do_deploy, engine=engine),
                         f"deploy on {engine} requested")

    action.__name__ = f"deploy_on_{engine}"
    return admin.action(description=f"Deploy on {label}")(action)


class PlacementForm(forms.Form):
    """Where the selected variants run: a node or anywhere, and the nodes that serve them too (replicas)."""

    node = forms.ChoiceField(label="Run on")
    replicas = forms.MultipleChoiceField(label="Replicas on", required=False, widget=forms.CheckboxSelectMultiple,
                                         help_text="The checked nodes serve it too; none checked drops the replicas.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = [(name, name) for name in Node.objects.values_list("name", flat=True)]
        self.fields["node"].choices = [(placement.ANYWHERE, "anywhere (the up node with the most memory left)"),
                                       *names]
        self.fields["replicas"].choices = names


class DeploymentInline(admin.StackedInline):
    model = Deployment
    can_delete = False
    readonly_fields = ["desired", "actual", "engine", "node", "replicas", "device", "detail", "updated_at"]
    fields = readonly_fields

    def has_add_permission(self, request, obj=None):
        return False


class NodeCopyInline(admin.TabularInline):
    """Each node's copy of the variant's files and whether it matches the manifest (appliance.copies)."""

    model = NodeCopy
    verbose_name, verbose_name_plural = "copy on a node", "copies on the nodes"
    can_delete = False
    fields = readonly_fields = ["node", "state", "detail", "updated_at"]
    extra = 0

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(ModelVariant)
class ModelVariantAdmin(admin.ModelAdmin):
    list_display = ["name", "kind_label", "architecture", "params", "size", "status_badge", "progress_bar",
                    "serving", "fit_verdict"]
    list_filter = ["kind", "status", "random_weights"]
    search_fields = ["name", "architecture"]
    actions = ["verify_files", "replace_bad_copies", "analyse_fit", "deploy", "deploy_anywhere", "deploy_on_nodes",
               *(deploy_on(engine, label) for engine, label in Engine.choices),
               "undeploy", "delete_variants"]
    inlines = [DeploymentInline, NodeCopyInline]
    readonly_fields = ["name", "kind", "origin", "lineage_tree", "provenance_table", "architecture", "model_type",
                       "params_total", "params_active", "dtype", "context_length", "source_path", "store_path",
                       "size_bytes", "status", "status_detail", "progress", "progress_detail", "random_weights",
                       "metadata", "manifest", "created_at", "updated_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("deployment", "fit")

    def get_urls(self):
        fit = path("<path:object_id>/fit/", self.admin_site.admin_view(self.fit_view),
                   name="appliance_modelvariant_fit")
        return [fit, *super().get_urls()]

    def fit_view(self, request, object_id):
        """Show the fit advisor's report, predicted against measured, and a recommendation."""
        variant = get_object_or_404(self.get_queryset(request), pk=object_id)
        users = positive_int(request.GET.get("users"), 8)
        context = positive_int(request.GET.get("context"), settings.FIT_CONTEXT)
        try:
            charts = fitting.charts_dir(variant)
        except OutsideStore:  # a name stored before names were checked ('../x'): no charts rather than a 500
            charts = None
        live = fitting.live_telemetry(variant) or {}
        return TemplateResponse(request, "admin/appliance/modelvariant/fit.html", {
            "expert_hits": live.get("expert_hits"), "telemetry": live.get("snapshot"),
            "telemetry_svg": expert_heatmap(live["snapshot"]) if live else "",
            **self.admin_site.each_context(request), "title": f"Fit of {variant.name}", "variant": variant,
            "fit": getattr(variant, "fit", None), "comparison": fitting.predicted_vs_measured(variant),
            "memory_chart": chart_base64(charts, "memory.svg"), "expert_chart": chart_base64(charts, "experts.svg"),
            "users": users, "context": context, "recommendation": fitting.recommendation(users, context),
            "throughput": fitting.throughput_advice(variant, request.GET),
            "family": lineage.family(variant),
        })

    @admin.display(description="fit on this box", ordering="fit__verdict")
    def fit_verdict(self, obj):
        fit = getattr(obj, "fit", None)
        label = f"{fit.verdict} ({fit.margin_gb:+.1f} GB)" if fit else "not analysed"
        return format_html('<a href="{}">{}</a>', reverse("admin:appliance_modelvariant_fit", args=[obj.pk]), label)

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ImportForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj else []

    def get_fields(self, request, obj=None):
        return self.readonly_fields if obj else [*ImportForm.Meta.fields, *ImportForm.EXTRA]

    def get_inlines(self, request, obj):
        return self.inlines if obj else []

    def save_model(self, request, obj, form, change):
        if change:
            return  # every field is read-only; state changes go through the actions
        variant = actions.do_start_import(name=obj.name, kind=obj.kind, source_path=form.cleaned_data["source_path"],
                                          actor=actor_of(request), provenance=form.provenance,
                                          parents=form.parents(), node=form.cleaned_data.get("node") or None)
        obj.pk = variant.pk

    def get_actions(self, request):
        found = super().get_actions(request)
        found.pop("delete_selected", None)  # deletion must remove files and record an event
        return found

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="kind", ordering="kind")
    def kind_label(self, obj):
        if obj.random_weights:
            return format_html('{} <span title="random weights: output is noise" '
                               'style="color:#b58900">(random-weight demo)</span>', obj.get_kind_display())
        if obj.status in ("ready", "deployed"):
            return format_html('{} <span title="{}" style="color:#2aa198">(real model{})</span>',
                               obj.get_kind_display(), source_line(obj.provenance),
                               f", {obj.provenance['license']}" if obj.provenance.get("license") else "")
        return obj.get_kind_display()

    @admin.display(description="origin")
    def origin(self, obj):
        return source_line(obj.provenance) or "–"

    @admin.display(description="lineage")
    def lineage_tree(self, obj):
        up, down = lineage.ancestors(obj), lineage.descendants(obj)
        if not up and not down:
            return "no parents or children recorded"
        return format_html("{}<b>{}</b>{}", render_nodes(up, "ancestors"), obj.name, render_nodes(down, "descendants"))

    @admin.display(description="provenance")
    def provenance_table(self, obj):
        rows = [(key, value) for key, value in sorted(obj.provenance.items()) if key != "gguf_metadata"]
        meta = obj.provenance.get("gguf_metadata") or {}
        rows += [(f"gguf {key}", value) for key, value in sorted(meta.items()) if key.startswith("general.")]
        return format_html("<table>{}</table>", format_html_join_rows(rows)) if rows else "–"

    @admin.display(description="parameters (total / active)", ordering="params_total")
    def params(self, obj):
        if obj.params_total is None:
            return "–"
        if obj.params_active and obj.params_active != obj.params_total:
            return f"{count(obj.params_total)} / {count(obj.params_active)}"
        return count(obj.params_total)

    @admin.display(description="size", ordering="size_bytes")
    def size(self, obj):
        return f"{obj.size_bytes / 1e6:,.1f} MB" if obj.size_bytes else "–"

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        return format_html('<b style="color:{}" title="{}">{}</b>', STATUS_COLOURS.get(obj.status, "#000"),
                           obj.status_detail, obj.get_status_display())

    @admin.display(description="progress")
    def progress_bar(self, obj):
        return format_html('<progress max="100" value="{}"></progress> {}% <small>{}</small>', obj.progress,
                           obj.progress, obj.progress_detail if obj.status == "importing" else "")

    @admin.display(description="engine")
    def serving(self, obj):
        dep = getattr(obj, "deployment", None)
        if dep is None:
            return "–"
        text = dep.actual if dep.converged else f"{dep.actual} → {dep.desired}"
        where = " ".join(part for part in (f"on {dep.node}" if dep.node else "", f"({dep.device})" if dep.device
                                           else "", f"+ replicas on {', '.join(dep.replicas)}" if dep.replicas
                                           else "") if part)
        return f"{dep.engine}: {text} {where}".rstrip()

    def _each(self, request, queryset, action, verb):
        for variant in queryset:
            try:
                action(variant, actor=actor_of(request))
                self.message_user(request, f"{variant.name}: {verb}")
            except actions.ActionRefused as exc:
                self.message_user(request, str(exc), messages.ERROR)

    @admin.action(description="Verify files against the manifest")
    def verify_files(self, request, queryset):
        self._each(request, queryset, actions.do_verify, "verification queued")

    @admin.action(description="Replace altered or failed copies on nodes (fetch them again from a ready copy)")
    def replace_bad_copies(self, request, queryset):
        self._each(request, queryset, actions.do_replace_bad_copies, "fresh copies requested")

    @admin.action(description="Analyse fit for this box")
    def analyse_fit(self, request, queryset):
        self._each(request, queryset, actions.do_analyse_fit, "fit analysis queued")

    @admin.action(description="Deploy (load into the engine)")
    def deploy(self, request, queryset):
        self._each(request, queryset, actions.do_deploy, "deploy requested")

    @admin.action(description="Deploy anywhere (the up node with the most memory left)")
    def deploy_anywhere(self, request, queryset):
        self._each(request, queryset, functools.partial(actions.do_deploy, node=placement.ANYWHERE),
                   "deploy requested")

    @admin.action(description="Deploy on chosen nodes (a node or anywhere, and replicas)")
    def deploy_on_nodes(self, request, queryset):
        # The first post shows the form; its own post (post=yes) deploys through do_deploy, which checks each node.
        form = PlacementForm(request.POST if request.POST.get("post") == "yes" else None)
        if form.is_bound and form.is_valid():
            self._each(request, queryset, functools.partial(actions.do_deploy, node=form.cleaned_data["node"],
                                                            replicas=form.cleaned_data["replicas"]),
                       "deploy requested")
            return None
        return TemplateResponse(request, "admin/appliance/modelvariant/deploy_on_nodes.html", {
            **self.admin_site.each_context(request), "title": "Deploy on chosen nodes", "form": form,
            "opts": self.model._meta, "variants": queryset, "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        })

    @admin.action(description="Undeploy (unload from the engine)")
    def undeploy(self, request, queryset):
        self._each(request, queryset, actions.do_undeploy, "undeploy requested")

    @admin.action(description="Delete variants and their stored files", permissions=["change"])
    def delete_variants(self, request, queryset):
        # Deleting removes the files for good, so the first post only asks; the confirmation page posts again.
        if request.POST.get("post") != "yes":
            return TemplateResponse(request, "admin/appliance/modelvariant/delete_variants.html", {
                **self.admin_site.each_context(request), "title": "Delete these variants and their files?",
                "opts": self.model._meta, "variants": queryset.select_related("deployment"),
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            })
        self._each(request, queryset, actions.do_delete, "deleted")


def source_line(provenance: dict) -> str:
    """Return one line saying where a variant came from: format and hash, upstream, distribution, Ollama."""
    parts = []
    if provenance.get("format"):
        sha = provenance.get("sha256")
        parts.append(provenance["format"] + (f" sha256 {sha[:12]}…" if sha else "")
                     + (f" {provenance['quantization']}" if provenance.get("quantization") else ""))
    upstream = provenance.get("upstream") or {}
    repo = upstream.get("repository") or upstream.get("source.huggingface.repository") or upstream.get("repo_url")
    if repo:
        parts.append(f"upstream {repo}" + (f"@{upstream['revision']}" if upstream.get("revision") else ""))
    dist = provenance.get("distribution") or {}
    if dist:
        parts.append(f"from {dist.get('index')} {dist.get('package')} {dist.get('version')}")
    if provenance.get("ollama"):
        parts.append(f"from Ollama {provenance['ollama'].get('ref')}")
    if provenance.get("imported_by"):
        parts.append(f"imported by {provenance['imported_by']}")
    return "; ".join(parts)


def render_nodes(nodes: list, direction: str):
    """Return nested lists of a lineage: parents above the variant (ancestors), children below it."""
    if not nodes:
        return ""
    items = []
    for node in nodes:
        name = (format_html('<a href="{}">{}</a>', reverse("admin:appliance_modelvariant_change", args=[node.variant.pk]),
                            node.name) if node.variant else format_html("{} <i>(not registered)</i>", node.name))
        relation = lineage.relation_label(node.relation)
        label = (format_html("{} — this is {} it", name, relation) if direction == "ancestors"
                 else format_html("{} — {} this", name, relation))
        items.append(format_html("<li>{}{}</li>", label, render_nodes(node.children, direction)))
    return format_html('<ul class="lineage-{}">{}</ul>', direction, mark_safe("".join(items)))


def format_html_join_rows(rows):
    return mark_safe("".join(format_html("<tr><th>{}</th><td>{}</td></tr>", key, value) for key, value in rows))


def positive_int(raw, default: int) -> int:
    try:
        return max(1, int(raw))
    except (TypeError, ValueError):
        return default


def chart_base64(folder: Path | None, name: str) -> str:
    """Return a chart file inlined for an <img src="data:image/svg+xml…">, or "" when it (or its folder) does not
    exist. An <img>, not inline markup: a file read from disk then cannot script the page, whatever it holds."""
    path = None if folder is None else folder / name
    return base64.b64encode(path.read_bytes()).decode() if path is not None and path.is_file() else ""


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    can_delete = False
    fields = readonly_fields = ["key_link", "name", "created_at", "expires_at", "last_used_at", "revoked_at"]

    def has_add_permission(self, request, obj=None):
        return False

    @admin.display(description="key")
    def key_link(self, obj):
        return format_html('<a href="{}">{}…</a>', reverse("admin:appliance_apikey_change", args=[obj.pk]), obj.prefix)


LIMIT_HELP = "Empty means unlimited. Windows are calendar minutes, days and months in UTC."


class LimitsAdminMixin:
    """Send every change of access or limits through appliance.actions, so each is one ledger event."""

    change_action = None  # the do_update_* function of appliance.actions

    def save_model(self, request, obj, form, change):
        if not change:
            return self.create(request, obj, form)
        # The form already set the fields on obj; the action re-applies them under a lock and logs the diff.
        values = {f: form.cleaned_data[f] for f in self.editable_values if f in form.cleaned_data}
        fresh = type(obj).objects.get(pk=obj.pk)
        type(self).change_action(fresh, actor=actor_of(request), values=values,
                                 variants=form.cleaned_data.get("variants"))

    def save_related(self, request, form, formsets, change):
        # Variants were set by the action (or by create()), so the form's own m2m save is skipped;
        # the inline rows are read-only, and saving their formsets changes nothing.
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)

    def limits_summary(self, obj):
        parts = [f"{v:,} {label}" for v, label in (
            (obj.requests_per_minute, "req/min"), (obj.tokens_per_minute, "tok/min"),
            (obj.tokens_per_day, "tok/day"), (obj.tokens_per_month, "tok/month")) if v is not None]
        return ", ".join(parts) or "unlimited"
    limits_summary.short_description = "limits"


@admin.register(Team)
class TeamAdmin(LimitsAdminMixin, admin.ModelAdmin):
    list_display = ["name", "access", "limits_summary", "active_keys", "usage_link", "created_at"]
    search_fields = ["name"]
    inlines = [ApiKeyInline]
    actions = ["issue_key"]
    filter_horizontal = ["variants"]
    editable_values = ["all_variants", *Team.LIMIT_FIELDS]
    change_action = do_update_team
    fieldsets = [
        (None, {"fields": ["name", "created_at"]}),
        ("Access", {"fields": ["all_variants", "variants"]}),
        ("Limits", {"fields": list(Team.LIMIT_FIELDS), "description": LIMIT_HELP}),
    ]

    def get_readonly_fields(self, request, obj=None):
        return ["name", "created_at"] if obj else ["created_at"]

    def create(self, request, obj, form):
        created = actions.do_create_team(obj.name, actor=actor_of(request))
        values = {f: form.cleaned_data[f] for f in self.editable_values if f in form.cleaned_data}
        do_update_team(created, actor=actor_of(request), values=values,
                               variants=form.cleaned_data.get("variants"))
        obj.pk = created.pk

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="variants")
    def access(self, obj):
        if obj.all_variants:
            return "all ready variants"
        return ", ".join(obj.variants.values_list("name", flat=True)) or "none"

    @admin.display(description="active keys")
    def active_keys(self, obj):
        return obj.api_keys.filter(revoked_at__isnull=True).count()

    @admin.display(description="usage")
    def usage_link(self, obj):
        return format_html('<a href="{}">usage</a>', reverse("console-usage-team", args=[obj.name]))

    @admin.action(description="Issue a new API key (shown once)")
    def issue_key(self, request, queryset):
        for team in queryset:
            key, plaintext = actions.do_issue_api_key(team, actor=actor_of(request), name="console")
            self.message_user(request, format_html(
                "New key for team <b>{}</b> — copy it now, it is not shown again: <code>{}</code>",
                team.name, plaintext), messages.WARNING)


@admin.register(ApiKey)
class ApiKeyAdmin(LimitsAdminMixin, admin.ModelAdmin):
    list_display = ["prefix", "team", "name", "state", "limits_summary", "created_at", "expires_at", "last_used_at"]
    list_filter = ["team"]
    filter_horizontal = ["variants"]
    editable_values = ["name", "expires_at", *ApiKey.LIMIT_FIELDS]
    change_action = do_update_api_key
    actions = ["revoke"]
    fieldsets = [
        (None, {"fields": ["team", "prefix", "name", "created_at", "last_used_at", "revoked_at", "expires_at"]}),
        ("Access", {"fields": ["variants"], "description": "Leave empty to allow whatever the team may use."}),
        ("Limits", {"fields": list(ApiKey.LIMIT_FIELDS), "description": LIMIT_HELP}),
    ]
    readonly_fields = ["team", "prefix", "created_at", "last_used_at", "revoked_at"]

    def has_add_permission(self, request):
        return False  # keys are issued from the team page, so the plaintext is shown once

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="state")
    def state(self, obj):
        if obj.revoked_at:
            return "revoked"
        return "expired" if obj.is_expired else "active"

    @admin.action(description="Revoke (refused from the next request on)")
    def revoke(self, request, queryset):
        for key in queryset.filter(revoked_at__isnull=True):
            actions.do_revoke_api_key(key, actor=actor_of(request))
        self.message_user(request, "revoked")


from .console import nodes  # noqa: E402, F401  (registers the Nodes page)

# The console's first page is the dashboard (appliance.console.dashboard renders it).
admin.site.index_template = "console/dashboard.html"
