"""Planning specs and the inventory of this box."""
import pytest

from inference.fit import HardwareSpecError, inventory, parse_hardware


@pytest.mark.parametrize("spec,gpus,memory", [("8xH20", 8, 768), ("8xH800", 8, 640), ("8xH200", 8, 1128),
                                             ("4xA100-80G", 4, 320), ("2xRTX4090", 2, 48), ("cpu:512G", 0, 512),
                                             ("cpu:1024G", 0, 1024), ("8xH20+cpu:2T", 8, 768)])
def test_it_parses_planning_specs(spec, gpus, memory):
    hw = parse_hardware(spec)
    assert (hw.gpus, hw.device_memory_gb) == (gpus, memory)
    assert hw.bandwidth_tbs > 0 and hw.bf16_tflops > 0


@pytest.mark.parametrize("spec,bad", [("8xH2O", "8xH2O"), ("8xH20+cpu:lots", "cpu:lots"), ("8xH20+0xH20", "0xH20"),
                                      ("4x@", "4x@")])
def test_errors_name_the_bad_part(spec, bad):
    with pytest.raises(HardwareSpecError, match=bad):
        parse_hardware(spec)


def test_inventory_reports_this_box():
    hw = inventory(measure=False)
    assert hw.host_ram_gb > 0 and hw.device_memory_gb > 0
