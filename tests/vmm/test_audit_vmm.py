"""The VMM against QEMU's code (accel/kvm/kvm-all.c, system/dirtylimit.c, system/cpu-throttle.c,
migration/ram.c, migration/migration.c): rules an audit found missing. Each test states QEMU's
rule and where it lives."""

from __future__ import annotations

from ringenv.vmm import MigrationRun

from ._helpers import small

MS = 1_000_000
NS = 1_000_000_000

def test_a_16k_or_64k_host_page_goes_on_the_wire_as_4k_target_pages_each_with_its_header():
    """QEMU's migration stream is in target pages (TARGET_PAGE_SIZE, 4 KiB for an arm64 guest
    whatever the host's granule: arm_cpu_realizefn asks set_preferred_target_page_bits(12)).
    KVM logs a host page; kvm_slot_sync_dirty_pages -> cpu_physical_memory_set_dirty_lebitmap
    marks each of its host_page / 4 KiB target pages dirty, and ram_save_host_page sends them
    one by one (ram_save_target_page -> save_normal_page -> save_page_header: a be64 offset |
    flags, 8 bytes, per target page). A dirty 64 KiB host page is 16 x (8 + 4096) = 65664 bytes
    on the wire, a 16 KiB page 4 x 4104 = 16416; ram_transferred_add counts TARGET_PAGE_SIZE per
    page (the same payload bytes).

    (Before, a host page had one header: 65544 and 16392 bytes, 0.18% and 0.15% short.)"""
    for host in ("arm64-16k", "arm64-64k"):
        cfg = small("web", 512 << 20, host=host)
        m = MigrationRun(cfg).run()
        ps = cfg.profile.page_size
        per_page = (m.bytes_sent - cfg.link.device_state_bytes) / m.pages_sent
        assert per_page >= ps + 8 * (ps // 4096), (host, per_page, ps + 8 * (ps // 4096))
