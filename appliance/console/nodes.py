"""The console's Nodes page: every box of the appliance, its state from the heartbeat's age, what it serves."""
from django.contrib import admin
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.html import format_html

from ..models import Node, NodeState

STATE_COLOURS = {NodeState.UP: "#2aa198", NodeState.STALE: "#b58900", NodeState.DOWN: "#dc322f"}


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    """Read-only: nodes register themselves at start and heartbeat (appliance.nodes); nobody edits them."""

    list_display = ["name", "state", "last_heartbeat", "address", "serves", "outstanding", "gpu_list", "memory",
                    "version"]
    readonly_fields = list_display

    @admin.display(description="state")
    def state(self, obj: Node):
        state = NodeState(obj.state(timezone.now()))
        return format_html('<b style="color:{}">{}</b>', STATE_COLOURS[state], state.label)

    @admin.display(description="serves")
    def serves(self, obj: Node) -> str:
        return ", ".join(obj.serving) or "—"

    @admin.display(description="GPUs")
    def gpu_list(self, obj: Node) -> str:
        return ", ".join(f"{gpu['name']} ({filesizeformat(gpu['memory_bytes'])})" for gpu in obj.gpus) or "none"

    @admin.display(description="memory")
    def memory(self, obj: Node) -> str:
        return filesizeformat(obj.memory_bytes)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
