"""Seeded workload models: the guest as a set of page classes written at known rates.

Only the first write to a clean (write-protected since its last write) page matters to KVM;
later writes to a writable page cost a few ns and change nothing. Writes to a page of rate ``r``
form a Poisson process, so its first write in a window of ``dt`` falls there with probability
``1 - exp(-r dt)``, at a truncated-exponential time. The model samples those first writes
directly:

- a class is a set of pages with one per-page rate and one split of that rate over the vCPUs
  (a uniform region; a rank bucket of a Zipf region; one vCPU's slice of a private region);
- in a window, ``Binomial(pages_c, 1 - exp(-r dt))`` pages of the class are written, chosen
  uniformly among all its pages, each at its first-write time (for a cold class, where a page is
  rarely written twice in the window, the raw Poisson writes are drawn instead, which is cheaper
  and equally exact since the host ignores repeated writes);
- the writing vCPU is drawn by the rate split over the vCPUs that are in the guest;
- a sequential scan is deterministic: a pointer sweeping its region at its rate.

The batch is marked ``first_touch``: the host skips a sampled page that is not clean (it is
already writable, so the write is invisible), which is exact because the host's windows always
end where pages are re-protected (an exit, a harvest). When the host cuts a window short, the
sampled future is dropped and drawn again from the new state, exact in distribution by
memorylessness. No per-page state is kept here, and the work per simulated second follows the
number of pages written, not the size of guest memory.

Rates are per second of guest time while the writing vCPU is in the guest, at full speed. The
host charges a fault's service time to the vCPU; the workload slows down by it once its own work
(``cpu_busy``) and the faults would take more than all of the vCPU's time (the closed loop:
:meth:`WorkloadProgram.consumed`). Time out of the guest (exits, throttle sleeps, lock waits)
removes its writes whatever ``cpu_busy``: a workload with idle time does not catch up after it
(a request-driven guest partly would, so throttles act more on it here than they would).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..config import WorkloadConfig, checked_number, load_workload
from ..jit import njit
from .base import GuestProgram, WriteBatch

NS = 1e9
GUEST_WRITE = 4096  # bytes of one guest store burst: workload rates are in 4 KiB page writes
_NONE_I = np.zeros(0, dtype=np.int64)
MAX_EVENTS = 1 << 15  # events per window, to bound memory and wasted sampling
RAW_WRITES_BELOW = 0.05  # per-page expected writes in a window below which raw writes are sampled
SPEED_TAU_NS = 1e6  # the closed loop's memory: kernel time and progress over about the last ms
# what the closed loop knows before it measures anything: SPEED_TAU_NS of progress with no
# kernel time, so that a first window's few faults weigh as a few faults in a ms, not as the
# load of the next window (which can last ~1 s with the bitmap); real progress outweighs it
# within a few SPEED_TAU_NS
SPEED_PRIOR_NS = SPEED_TAU_NS
SPEED_STEP = 0.01  # a vCPU's speed moves by more than this share of itself, or not at all
MIN_SPEED = 1e-3  # the slowest a workload runs (kernel time ~1000x its progress)


class _Region:
    """A range of guest RAM; ``gpi(ranks)`` places rank r at a page of the range. A scattered
    region uses a fixed bijection: an affine map modulo the next power of two, cycle-walked back
    into the range (a mask, not a division, so placing millions of pages stays cheap)."""

    __slots__ = ("start", "n", "perm_a", "perm_b", "mask")

    def __init__(self, start, n, scattered, rng):
        self.start, self.n = start, n
        self.perm_a, self.perm_b, self.mask = 1, 0, 0
        if scattered and n > 2:
            size = 1 << (n - 1).bit_length()
            self.mask = size - 1
            self.perm_a = (int(size * 0.6180339887) | 1) & self.mask or 1
            self.perm_b = int(rng.integers(0, size))

    def gpi(self, ranks: np.ndarray) -> np.ndarray:
        out = np.empty(len(ranks), dtype=np.int64)
        _place_all(np.ascontiguousarray(ranks, dtype=np.int64), self.perm_a, self.perm_b, self.mask, self.n,
                   self.start, out)
        return out


@numba.njit(inline="always")
def _place(x, a, b, m, n):  # pragma: no cover - compiled
    """Where rank x of a region of n pages lands: the affine bijection x -> (a x + b) mod m+1,
    cycle-walked back into [0, n) (identity when a == 1 and b == 0)."""
    if a != 1 or b != 0:
        x = (x * a + b) & m
        while x >= n:
            x = (x * a + b) & m
    return x


@njit(nogil=True)
def _place_all(ranks, a, b, m, n, start, out):  # pragma: no cover - compiled
    for i in range(ranks.shape[0]):
        out[i] = start + _place(ranks[i], a, b, m, n)


class WorkloadProgram(GuestProgram):
    """A :class:`~ringenv.config.WorkloadConfig` running on ``nr_vcpus`` vCPUs, seeded.

    ``seed`` fixes the workload's timeline: the layout of its regions and its sequence of calm
    and burst phases. ``start_ns`` is where on that timeline the program starts (integer ns,
    >= 0): its time t is the timeline's t + start_ns, so its phases are those of t + start_ns
    and its sequential sweeps start where ``start_ns`` of running left them (every vCPU in the
    guest all along, at full speed: a sweep slowed by faults before ``start_ns`` would be a
    little behind that); the random draws of its writes are then its own (a stream seeded by
    ``seed`` and ``start_ns``), not those of a program started at 0. That is how a dirty-rate
    sample taken before a migration (the timeline's first seconds) and the migration (the
    same guest, from where the sample ended) share a workload without sharing its writes."""

    def __init__(self, workload, nr_vcpus: int, *, seed: int = 0, rate_scale: float = 1.0, start_ns: int = 0):
        checked_number(start_ns, "start_ns", "an integer number of ns >= 0", lambda ns: ns >= 0, integral=True)
        checked_number(rate_scale, "rate_scale", "a finite number > 0", lambda x: x > 0)
        self.cfg: WorkloadConfig = load_workload(workload)
        self.nr_vcpus = int(nr_vcpus)
        self.seed = seed
        self.rate_scale = float(rate_scale)
        self.start_ns = int(start_ns)
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
        self._phase_rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFA5E]))
        self.vm = None

    # ------------------------------------------------------------------ layout
    def attach(self, vm) -> None:
        self.vm = vm
        slot = vm._as0[0]  # guest RAM: the first memslot of address space 0
        self.ram_start, self.ram_base_gfn, npages = slot.start, slot.base_gfn, slot.npages
        self._gfn_offset = self.ram_base_gfn - self.ram_start  # global page index -> gfn
        self.page_size = vm.page_size
        nv = self.nr_vcpus
        gw_per_page = self.page_size / GUEST_WRITE
        lo, hi, rate, reg, weights, vfix = [], [], [], [], [], []
        self.regions = []
        scans = []  # (region, first page, pages, vCPU, pages per ns) of each sequential sweep
        pos = 0
        for rc in self.cfg.regions:
            n = max(1, int(rc.fraction * npages))
            n = min(n, npages - pos)
            if n <= 0:
                break
            region = _Region(self.ram_start + pos, n, rc.layout == "scattered", self.rng)
            self.regions.append(region)
            ridx = len(self.regions) - 1
            writes_ns = rc.rate_mbps * 1e6 / GUEST_WRITE / NS * self.rate_scale
            w = np.resize(np.asarray(rc.vcpu_weights or [1.0], dtype=float), nv)
            w = w / w.sum() if w.sum() > 0 else np.full(nv, 1.0 / nv)
            slices = [(v, v * n // nv, (v + 1) * n // nv) for v in range(nv)] if rc.share == "private" else [(-1, 0, n)]
            for v, a, b in slices:
                if b <= a:
                    continue
                share = 1.0 if v < 0 else w[v]
                if rc.pattern == "scan":
                    owner = v if v >= 0 else int(np.argmax(w))
                    # a sweep writing GUEST_WRITE bytes at a time reaches a new host page every
                    # page_size/GUEST_WRITE writes
                    scans.append((ridx, a, b - a, owner, writes_ns * share / gw_per_page))
                    continue
                for blo, bhi, frac in _buckets(b - a, rc.pattern, rc.zipf_s):
                    lo.append(a + blo)
                    hi.append(a + bhi)
                    # per host page: its share of the region's writes (each host page gathers
                    # page_size/4096 guest pages' worth for uniform writes)
                    rate.append(writes_ns * share * frac / (bhi - blo))
                    reg.append(ridx)
                    weights.append(np.eye(nv)[v] if v >= 0 else w)
                    vfix.append(v)
            pos += n
        self.c_lo = np.array(lo, dtype=np.int64)
        self.c_hi = np.array(hi, dtype=np.int64)
        self.c_rate = np.array(rate, dtype=float)
        self.c_region = np.array(reg, dtype=np.int64)
        self.c_w = np.array(weights, dtype=float).reshape(len(lo), nv)
        self.c_vfix = np.array(vfix, dtype=np.int64)
        self.c_n = self.c_hi - self.c_lo
        # shared classes grouped by their rate split over the vCPUs (usually one group)
        self.wrows, self.c_wgroup = [], np.full(len(lo), -1, dtype=np.int64)
        for c in range(len(lo)):
            if self.c_vfix[c] < 0:
                for gid, row in enumerate(self.wrows):
                    if np.array_equal(row, self.c_w[c]):
                        break
                else:
                    gid = len(self.wrows)
                    self.wrows.append(self.c_w[c].copy())
                self.c_wgroup[c] = gid
        # the sweeps, as arrays; s_pos: each pointer's position (pages into its range)
        self.s_region, self.s_a, self.s_n, self.s_vcpu = (np.array([x[i] for x in scans], dtype=np.int64)
                                                          for i in range(4))
        self.s_rate = np.array([x[4] for x in scans], dtype=float)
        self.s_pos = np.zeros(len(scans))
        self._r_start, self._r_n, self._r_a, self._r_b, self._r_mask = (
            np.array([getattr(r, f) for r in self.regions], dtype=np.int64)
            for f in ("start", "n", "perm_a", "perm_b", "mask"))
        self._marks = np.zeros(0, dtype=np.uint8)  # scratch of _sample_classes, sized at first use
        self._k, self._raw, self._hot_p = (np.zeros(len(lo), dtype=t) for t in (np.int64, bool, float))  # per window
        self._max_n = int(self.c_n.max()) if len(lo) else 0
        self._sweeps = len(scans) > 0  # any sweep pointers to move on (consumed)
        self._seeds: list[int] = []  # window seeds drawn ahead (_next_seed)
        self._seed_i = 0
        self.efficiency = 1.0  # share of sampled writes that find their page clean (for horizons)
        self._phase_t = [0]
        self._phase_m = []
        if self.cfg.phases is not None:
            ph = self.cfg.phases
            self._phase_m.append(ph.calm_multiplier if self._phase_rng.random() < ph.mean_calm_s /
                                 (ph.mean_calm_s + ph.mean_burst_s) else ph.burst_multiplier)
        else:
            self._phase_m.append(1.0)
        self._ph_lo, self._ph_hi, self._ph_m = (0, 1 << 62, 1.0) if self.cfg.phases is None else (0, 0, 1.0)
        self._rates: dict = {}  # (running vCPUs, multiplier) -> rates and writer shares (_rates_for)
        # the closed loop (consumed): per vCPU, the share of its nominal rates it runs at, and the
        # kernel ns and progress (ns at full speed) behind it, smoothed over SPEED_TAU_NS
        self.speed = np.ones(nv)
        self._busy = float(self.cfg.cpu_busy)
        self._k_seen = np.zeros(nv, dtype=np.int64)
        known = vm.vcpu_kernel_ns()[:nv]  # time lost before this program ran is not its own
        self._k_seen[:len(known)] = known
        self._acc_k, self._acc_p = np.zeros(nv), np.full(nv, SPEED_PRIOR_NS)
        self._loop_mult = 1.0  # the rate multiplier the speeds were set for
        self._s_eff = self.s_rate  # the sweeps' rates at the vCPUs' speeds
        if self.start_ns:
            # the sweeps as start_ns of running left them; the writes' draws a stream of their own
            self.s_pos = (self.s_rate * self._rate_time(self.start_ns)) % np.maximum(self.s_n, 1)
            self.rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5EED, self.start_ns]))

    # ------------------------------------------------------------------ phases
    def multiplier(self, t: int) -> tuple[float, int]:
        """Rate multiplier at t and the time the current phase ends (the program's time: the
        timeline's t + ``start_ns``)."""
        if self._ph_lo <= t < self._ph_hi:  # the phase of the last call (nearly always)
            return self._ph_m, self._ph_hi
        if self.cfg.phases is None:
            return 1.0, 1 << 62
        at = t + self.start_ns
        self._phases_until(at)
        i = int(np.searchsorted(self._phase_t, at, side="right")) - 1
        off = self.start_ns
        self._ph_lo, self._ph_hi, self._ph_m = self._phase_t[i] - off, self._phase_t[i + 1] - off, self._phase_m[i]
        return self._ph_m, self._ph_hi

    def _phases_until(self, at: int) -> None:
        """Draw the timeline's phases up to one that ends after ``at`` (timeline time)."""
        ph = self.cfg.phases
        while self._phase_t[-1] <= at:
            calm = self._phase_m[-1] == ph.calm_multiplier
            mean = ph.mean_calm_s if calm else ph.mean_burst_s
            self._phase_t.append(self._phase_t[-1] + max(1, int(self._phase_rng.exponential(mean) * NS)))
            self._phase_m.append(ph.burst_multiplier if calm else ph.calm_multiplier)

    def _rate_time(self, until: int) -> float:
        """The integral of the rate multiplier over the timeline's [0, until), ns: how far a
        sweep that ran all along has gone, in units of its rate."""
        if self.cfg.phases is None:
            return float(until)
        self._phases_until(until)
        total = 0.0
        for a, b, m in zip(self._phase_t, self._phase_t[1:], self._phase_m):
            if a >= until:
                break
            total += (min(b, until) - a) * m
        return total

    # ------------------------------------------------------------------ sampling
    def _rates_for(self, running: np.ndarray, mult: float) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray]:
        """What the sampler derives from the running vCPUs and the phase multiplier:
        per class, the write rate of one of its pages; per vCPU, the expected writes of all its
        pages and sweeps, per ns; whether any sweep writes; and per writer group (a shared
        class's rate split) the cumulative share of the running vCPUs, normalised to 1 (a vCPU
        out of the guest has a flat step: never drawn). They change only when a vCPU exits or
        re-enters or a phase changes, so they are kept per (running set, multiplier): vCPUs
        take turns at ring-full exits, so a few sets recur."""
        key = (running.tobytes(), mult)
        got = self._rates.get(key)
        if got is None:
            w = running * self.speed  # each vCPU's share of its nominal rates
            if len(self.c_lo):
                per_class = self.c_rate * mult * (self.c_w @ w)
                per_vcpu = (self.c_n * self.c_rate * mult) @ (self.c_w * w[None, :])
            else:
                per_class, per_vcpu = np.zeros(0), np.zeros(self.nr_vcpus)
            sweeping = False
            for v, r in zip(self.s_vcpu.tolist(), self._s_eff.tolist()):
                if running[v]:
                    per_vcpu[v] += r * mult
                    sweeping = sweeping or r > 0
            if not self.wrows:
                cdf = np.ones((1, self.nr_vcpus))
            else:
                cdf = np.cumsum(np.array(self.wrows) * w[None, :], axis=1)
                cdf /= np.where(cdf[:, -1:] > 0, cdf[:, -1:], 1.0)
                cdf[cdf >= cdf[:, -1:]] = 1.0  # exactly 1 from the last running vCPU on (u < 1 always)
            if len(self._rates) >= 64:
                self._rates.clear()
            got = self._rates[key] = (per_class, per_vcpu, sweeping, cdf)
        return got

    def horizon(self, now, until, running, room):
        """The window end :meth:`window` picks (see :func:`_window_end`)."""
        mult, phase_end = self.multiplier(now)
        per_vcpu = self._rates_for(running, mult)[1]
        return int(_window_end(now, until, phase_end, room, per_vcpu, self.efficiency, running))

    def window(self, now, until, running, room):
        """The candidate first writes of the running vCPUs from ``now`` to a window end in
        (now, until] chosen so that the window holds a few more writes than the fullest
        ring's room (or at most MAX_EVENTS), and ends where the phase does: all in one
        compiled call (:func:`_sample_window`). The batch comes with its ``order`` (the host
        gathers the events as it walks them)."""
        return self._sample(now, until, running, room)

    def next_writes(self, now, until, running):
        """The writes up to ``until`` or the end of the current phase, whichever comes first
        (the batch's ``complete_until``): one rate multiplier holds within a batch."""
        return self._sample(now, min(until, self.multiplier(now)[1]), running, None).ordered()

    def _sample(self, now, until, running, room):
        self._window = (now, running.copy())
        if until <= now:
            return WriteBatch.empty(until)
        mult, phase_end = self.multiplier(now)
        if mult != self._loop_mult:  # a new phase: the kernel time per ns follows the write rate
            self._loop_mult = mult
            if mult > 0 and _speeds(self._busy, mult, self.speed, self._acc_k, self._acc_p):
                self._speeds_moved()
        lam, per_vcpu, sweeping, cdf = self._rates_for(running, mult)
        seed = self._next_seed()
        while True:
            t, vc, g, key, mask, end = _sample_window(
                seed, now, until, room is None, phase_end, _NONE_I if room is None else room, per_vcpu, self.efficiency,
                mult, lam, sweeping, running, cdf, self.c_lo, self.c_n, self.c_region, self.c_vfix, self.c_wgroup,
                self._k, self._raw, self._hot_p, self._marks, self._r_start, self._r_n, self._r_a, self._r_b,
                self._r_mask, self.s_region, self.s_a, self.s_n, self.s_vcpu, self._s_eff, self.s_pos)
            if end >= 0:
                break
            self._marks = np.zeros(self._max_n, dtype=np.uint8)  # first window with a hot class: its scratch
        return WriteBatch(t, vc, g + self._gfn_offset if self._gfn_offset else g, None, int(end), first_touch=True,
                          order=batch_order(key, int(mask)) if len(key) else None)

    def _next_seed(self) -> int:
        """The next window's seed: the workload Generator's next ``integers(1 << 32)``, drawn 64
        at a time (the same numbers as one by one: nothing else draws from it once the regions
        are laid out)."""
        i = self._seed_i
        if i == len(self._seeds):
            self._seeds, i = self.rng.integers(1 << 32, size=64).tolist(), 0
        self._seed_i = i + 1
        return self._seeds[i]

    def consumed(self, n, t_cut, faults_per_vcpu, retried, written):
        """Learn the share of sampled writes that find their page clean, move the sweeps on, and
        close the loop: the vCPUs' time in the kernel (faults, splits, PML flushes: the host's
        ``fault_ns``) is time their workload does not run. With L kernel ns per ns of progress
        at full speed (measured per unit of the phase's rate multiplier, smoothed over
        SPEED_TAU_NS of the windows' time), a vCPU runs at speed 1 while ``cpu_busy`` + L <= 1
        (the faults fit in its spare time) and 1 / (``cpu_busy`` + L) past that; its write
        rates and sweeps are scaled by it from the next window on (:func:`_closed_loop`), and
        at once when a phase changes the multiplier (:meth:`_sample`). So the kernel's share of
        a vCPU's time stays below 1 but for a window after a sudden rise of its faults within a
        phase, which runs at the speed of the one before: the first window (nothing measured
        yet), the one after many pages were re-protected at once (a bitmap sync, a harvest).
        Before any measurement the loop counts SPEED_PRIOR_NS of progress with no kernel time,
        so that the faults of a first window of a few us do not set the speed of the next one
        (which, with nothing to end it, can last up to MAX_EVENTS writes).
        Ring-full exits, throttle sleeps and lock waits need no
        such step: the vCPU is out of the guest then and draws no writes (and does not catch
        up after, whatever ``cpu_busy``). ``cpu_busy`` 0 is the closest to an open-loop guest:
        it slows down only when the faults alone would take all of its time. There the share
        is 1 on average and each window's is the Poisson noise of its faults around it: a
        vCPU whose faults alone would take more than all of its time (``cpu_busy`` 0, r c >= 1)
        spends up to ~10-25% more than a short interval in the kernel in some intervals and
        correspondingly less in others (no shipped workload comes near)."""
        now, running = self._window
        if n >= 256:  # learn how many sampled writes find their page clean
            self.efficiency = float(min(max(0.7 * self.efficiency + 0.3 * written / n, 0.02), 1.0))
        dt = t_cut - now
        if dt > 0 and self._sweeps:
            mult, _ = self.multiplier(now)
            _advance_sweeps(running, mult, dt, self.s_vcpu, self._s_eff, self.s_n, self.s_pos)
        moved = _closed_loop(self.vm.vcpu_kernel_ns(), self._k_seen, running, max(dt, 0), self._busy, self.speed,
                             self._acc_k, self._acc_p, self._loop_mult)
        if moved:
            self._speeds_moved()

    def _speeds_moved(self) -> None:
        """The vCPUs' speeds changed: the rates derived from them are redone when next needed."""
        self._rates.clear()
        self._s_eff = self.s_rate * self.speed[self.s_vcpu] if self._sweeps else self.s_rate


@numba.njit(inline="always")
def _set_speed(speed, v, busy, acc_k, acc_p, mult):  # pragma: no cover - compiled
    """Set vCPU v's speed for its load, ``busy`` + kernel ns per unit of nominal progress
    (``acc_k`` / ``acc_p``) * ``mult`` (nothing if no progress is measured yet): 1 up to a load
    of 1, else 1 / load (at least MIN_SPEED). It moves only by more than SPEED_STEP of itself,
    or back to exactly 1, so that the rates the sampler derives from the speeds (kept until a
    speed moves) are not redone every window. Returns whether it moved."""
    if acc_p[v] <= 0.0:
        return False
    load = busy + acc_k[v] / acc_p[v] * mult
    s = 1.0 if load <= 1.0 else max(1.0 / load, MIN_SPEED)
    if abs(s - speed[v]) > SPEED_STEP * speed[v] or (s == 1.0 and speed[v] != 1.0):
        speed[v] = s
        return True
    return False


@njit(nogil=True)
def _closed_loop(kernel_ns, k_seen, running, dt, busy, speed, acc_k, acc_p, mult):  # pragma: no cover - compiled
    """Update each vCPU's ``speed`` after a window of ``dt`` ns at rate multiplier ``mult`` (see
    :meth:`WorkloadProgram.consumed`): for a vCPU that ran, its kernel ns since the last call
    (``kernel_ns`` - ``k_seen``) and its progress in units of the nominal rates (``dt * speed
    * mult``), both smoothed with a decay of exp(-dt / SPEED_TAU_NS) (none at multiplier 0); the kernel ns of a vCPU
    out of the guest (a PML flush at its exit) are added without decay (no time passed for it
    in the guest). The speed from the load (:func:`_set_speed`).
    Returns whether a speed moved."""
    # the estimate is forgotten as the workload runs: not while its rate multiplier is 0 (a
    # phase with no writes teaches nothing, and a long one would wipe what the next burst needs)
    decay = np.exp(-dt / SPEED_TAU_NS) if mult > 0.0 else 1.0
    moved = False
    for v in range(speed.shape[0]):
        k = 0.0
        if v < kernel_ns.shape[0]:
            k = float(kernel_ns[v] - k_seen[v])
            k_seen[v] = kernel_ns[v]
        if not running[v]:
            acc_k[v] += k
            continue
        acc_k[v] = acc_k[v] * decay + k
        acc_p[v] = acc_p[v] * decay + dt * speed[v] * mult
        if _set_speed(speed, v, busy, acc_k, acc_p, mult):
            moved = True
    return moved


@njit(nogil=True)
def _speeds(busy, mult, speed, acc_k, acc_p):  # pragma: no cover - compiled
    """Every measured vCPU's speed at a new rate multiplier (a phase change): its kernel ns per
    unit of nominal progress scale with the rate. Returns whether a speed moved."""
    moved = False
    for v in range(speed.shape[0]):
        if _set_speed(speed, v, busy, acc_k, acc_p, mult):
            moved = True
    return moved


@njit(nogil=True)
def _window_end(now, until, phase_end, room, per_vcpu, efficiency, running):  # pragma: no cover - compiled
    """A window end in (now, until] worth sampling, given ``room[v]`` pushes left before vCPU
    v's ring is soft-full: a little past the soonest a running vCPU fills its room at its
    expected rate of first writes to clean pages (``per_vcpu``, the write rate of its pages,
    scaled by ``efficiency``, the share of recent samples that found their page clean), at most
    MAX_EVENTS expected writes, and not past the phase's end."""
    total = 0.0
    t_fill = np.inf
    for v in range(per_vcpu.shape[0]):
        lam = per_vcpu[v] * efficiency
        total += lam
        if running[v] and lam > 0:
            t_fill = min(t_fill, max(room[v], 1) / lam)
    if total <= 0:
        end = min(until, phase_end)
    else:
        dt = min(t_fill * 1.05 + 1000.0, MAX_EVENTS / total)
        end = min(until, phase_end, now + np.int64(max(1000.0, dt)))
    return min(until, max(now + 1, end))


@njit(nogil=True)
def _sample_window(seed, now, until, fixed_end, phase_end, room, per_vcpu, efficiency, mult, lam, sweeping, running,
                   cdf, c_lo, c_n, c_region, c_vfix, c_wgroup, k, raw, hot_p, marks, r_start, r_n, r_a, r_b, r_mask,
                   s_region, s_a, s_n, s_vcpu, s_rate, s_pos):  # pragma: no cover - compiled
    """One window of a workload: its end (``until``, or :func:`_window_end` unless
    ``fixed_end``), the class counts (:func:`_class_counts`), the random numbers of the
    classes and the writes (:func:`_draw_window`): (times, vCPUs, global page indexes, sort
    key, key mask, end). The counts come from numba's generator seeded with ``seed`` (drawn
    from the workload's Generator), the uniform and exponential numbers from a splitmix64
    stream seeded with it too, so a window depends on that seed only.
    End -1: a hot class needs ``marks`` of ``c_n.max()`` bytes first (call again)."""
    end = until if fixed_end else _window_end(now, until, phase_end, room, per_vcpu, efficiency, running)
    dt = end - now
    np.random.seed(seed)
    # cold classes (a page rarely written twice in the window): the raw write process,
    # Poisson(N r dt) writes to uniformly drawn pages at uniform times; the host skips a
    # repeated write to a page already dirty, so the first writes are exact. Hot classes:
    # Binomial(N, 1 - exp(-r dt)) distinct pages, each at its first-write time.
    total, nr, few = _class_counts(c_n, lam, dt, k, raw, hot_p)
    if nr < total and marks.shape[0] < c_n.max():
        return (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int64),
                np.empty(0, dtype=np.int64), np.int64(0), np.int64(-1))
    # the raw writes come time-ordered when nothing else joins them (no sort then)
    alone = total > 0 and nr == total and not sweeping
    st = np.zeros(2, dtype=np.uint64)  # a splitmix64 stream (state st[1]), seeded from seed
    st[1] = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    spacings = np.empty(nr + 1 if alone else 0)
    for i in range(spacings.shape[0]):
        spacings[i] = _exponential(st)
    # extra draws: the permutation of the raw run, and each distinct page with room for
    # repeats (a class is at most half taken: < 1.4 draws per page on average)
    extra = np.empty(((nr if alone else 0) + 2 * few + 64) if total else 0)
    for i in range(extra.shape[0]):
        extra[i] = _unit(st)
    uniforms = np.empty(3 * total)
    for i in range(uniforms.shape[0]):
        uniforms[i] = _unit(st)
    t, vc, g, key, mask = _draw_window(spacings, extra, uniforms, total, now, dt, end, mult, running, lam, c_lo, c_n,
                                       c_region, c_vfix, c_wgroup, cdf, k, raw, hot_p, marks, r_start, r_n, r_a, r_b,
                                       r_mask, s_region, s_a, s_n, s_vcpu, s_rate, s_pos)
    return t, vc, g, key, np.int64(mask), np.int64(end)


@njit(nogil=True)
def _draw_window(spacings, extra, uniforms, total, now, dt, until, mult, running, lam, c_lo, c_n, c_region, c_vfix,
                 c_wgroup, cdf, k, raw, hot_p, marks, r_start, r_n, r_a, r_b, r_mask, s_region, s_a, s_n, s_vcpu,
                 s_rate, s_pos):  # pragma: no cover - compiled
    """The candidate first writes of one window [now, now + dt) of the running vCPUs: (times,
    vCPUs, global page indexes, sort key, the key's position mask: see :func:`_order_key`).
    The classes' ``total`` writes (:func:`_sample_classes`, with the counts k/raw/hot_p of
    :func:`_class_counts` and the random numbers the caller drew in bulk), then every running
    sweep's pages (:func:`_sweep`). The batch is in (time, vCPU) order, ties in sampling order,
    once put in :func:`batch_order` (no key: it already is)."""
    ns = s_vcpu.shape[0]
    first = np.zeros(ns, dtype=np.int64)
    count = np.zeros(ns, dtype=np.int64)
    size = total
    for j in range(ns):  # one write per page a sweep's pointer passes in the window
        if running[s_vcpu[j]] and s_rate[j] > 0:
            first[j] = np.int64(np.ceil(s_pos[j]))
            count[j] = max(np.int64(np.ceil(s_pos[j] + s_rate[j] * mult * dt)) - first[j], 0)
            size += count[j]
    t = np.empty(size, dtype=np.int64)
    vc = np.empty(size, dtype=np.int32)
    g = np.empty(size, dtype=np.int64)
    nraw = 0  # the leading writes already in (time, vCPU) order
    if total:
        nraw = _sample_classes(extra, spacings, uniforms, k, raw, lam, hot_p, now, dt, c_lo, c_n, c_region, c_vfix,
                               c_wgroup, cdf, r_start, r_n, r_a, r_b, r_mask, marks, t[:total], vc[:total], g[:total])
    j0 = total
    for j in range(ns):
        if count[j]:
            reg = s_region[j]
            j1 = j0 + count[j]
            _sweep(first[j], count[j], s_pos[j], s_rate[j] * mult, s_a[j], s_n[j], s_vcpu[j], now, until,
                   r_start[reg], r_a[reg], r_b[reg], r_mask[reg], r_n[reg], t[j0:j1], vc[j0:j1], g[j0:j1])
            j0 = j1
    if size <= nraw:  # the raw writes' ordered run alone: no sort
        return t, vc, g, np.empty(0, dtype=np.int64), 0
    key, mask = _order_key(t, vc, now, dt)
    return t, vc, g, key, mask


@njit(nogil=True)
def _order_key(t, vc, now, dt):  # pragma: no cover - compiled
    """The sort key of a window's writes (times in [now, now + dt), vCPUs < 1024) for the
    order (time, vCPU, position in the batch): (key, mask) with the position in the key's low
    bits (``key & mask``) where that fits in 63 bits, so that sorting the keys themselves gives
    that one order; else (time, vCPU) alone and mask 0: a stable argsort then keeps the
    positions' order (see :func:`batch_order`)."""
    n = t.shape[0]
    key = np.empty(n, dtype=np.int64)
    shift = 1
    while (np.int64(1) << shift) < n:
        shift += 1
    unique = (dt + 1) * 1024 < (np.int64(1) << (62 - shift))
    for i in range(n):
        key[i] = ((t[i] - now) * 1024 + vc[i] << shift) | i if unique else t[i] * 1024 + vc[i]
    return key, (np.int64(1) << shift) - 1 if unique else np.int64(0)


def batch_order(key: np.ndarray, mask: int) -> np.ndarray:
    """The batch positions in the order of :func:`_order_key`'s key. A unique key is sorted as
    values (numpy's vectorised sort, several times faster than an argsort) and the positions
    read from its low bits; else a stable argsort. ``key`` is sorted in place."""
    if mask:
        key.sort()
        return key & mask
    return np.argsort(key, kind="stable")


@njit(nogil=True)
def _advance_sweeps(running, mult, dt, s_vcpu, s_rate, s_n, s_pos):  # pragma: no cover - compiled
    """Move the pointers of the running vCPUs' sweeps on by ``dt`` ns (modulo their range)."""
    for j in range(s_vcpu.shape[0]):
        if running[s_vcpu[j]]:
            s_pos[j] = (s_pos[j] + s_rate[j] * mult * dt) % s_n[j]


@njit(nogil=True)
def _sweep(first, count, pos, rate, a, n, vcpu, now, until, start, pa, pb, mask, rn,
           out_t, out_v, out_g):  # pragma: no cover - compiled
    """A sequential sweep's writes in a window: the pointer at ``pos`` (pages into its range
    [a, a + n) of a region) moving at ``rate`` pages per ns writes page ``first + j`` (modulo n)
    when it gets there, for j < count; placed in guest RAM as :func:`_place` places it."""
    for j in range(count):
        step = first + j
        out_g[j] = start + _place(a + step % n, pa, pb, mask, rn)
        out_t[j] = min(now + np.int64((step - pos) / rate), until - 1)
        out_v[j] = vcpu


@njit(nogil=True)
def _class_counts(c_n, lam, dt, k, raw, hot_p):  # pragma: no cover - compiled
    """Per class, how many writes the window has (into k): raw classes (per-page expected writes
    below RAW_WRITES_BELOW) Poisson(N lam dt) raw writes; others Binomial(N, hot_p) distinct
    pages, hot_p = 1 - exp(-lam dt). Drawn from numba's generator (seeded by the caller).
    Returns (all writes, raw writes, sum over the other classes of min(k, N - k))."""
    total = nr = few = 0
    for c in range(k.shape[0]):
        k[c] = 0
        raw[c] = False
        hot_p[c] = 0.0
        if lam[c] <= 0:
            continue
        if lam[c] * dt < RAW_WRITES_BELOW:
            raw[c] = True
            k[c] = np.random.poisson(c_n[c] * lam[c] * dt)
            nr += k[c]
        else:
            hot_p[c] = -np.expm1(-lam[c] * dt)
            k[c] = np.random.binomial(c_n[c], hot_p[c])
            few += min(k[c], c_n[c] - k[c])
        total += k[c]
    return total, nr, few


@numba.njit(inline="always")
def _uniform(buf, st):  # pragma: no cover - compiled
    """The next uniform number: those of ``buf`` in order (``st[0]``: how many were used), then a
    splitmix64 stream (``st[1]``: its state, seeded from buf's last number)."""
    i = st[0]
    st[0] = i + np.uint64(1)
    if i < np.uint64(buf.shape[0]):
        return buf[i]
    if i == np.uint64(buf.shape[0]):
        st[1] = np.uint64(buf[-1] * 9007199254740992.0) if buf.shape[0] else np.uint64(0)
    return _unit(st)


@numba.njit(inline="always")
def _unit(st):  # pragma: no cover - compiled
    """A uniform number in [0, 1) from the splitmix64 stream ``st`` (53 of its 64 bits)."""
    return np.float64(_splitmix(st) >> np.uint64(11)) / 9007199254740992.0


@numba.njit(inline="always")
def _splitmix(st):  # pragma: no cover - compiled
    """The next 64 random bits of the splitmix64 stream whose state is ``st[1]``."""
    st[1] += np.uint64(0x9E3779B97F4A7C15)
    z = st[1]
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _ziggurat_tables(n: int = 256, r: float = 7.69711747013104972, v: float = 3.949659822581572e-3):
    """The 256-layer ziggurat of the exponential density (Marsaglia and Tsang, "The Ziggurat
    Method for Generating Random Variables", J. Stat. Softw. 5(8), 2000): per layer, the
    acceptance bound k (a 53-bit integer), the width scale w and the density f at its edge."""
    m = float(1 << 53)
    k, w, f = np.zeros(n, dtype=np.uint64), np.zeros(n), np.zeros(n)
    de = te = r
    q = v / math.exp(-de)
    k[0], k[1] = int(de / q * m), 0
    w[0], w[n - 1] = q / m, de / m
    f[0], f[n - 1] = 1.0, math.exp(-de)
    for i in range(n - 2, 0, -1):
        de = -math.log(v / de + math.exp(-de))
        k[i + 1] = int(de / te * m)
        te = de
        f[i] = math.exp(-de)
        w[i] = de / m
    return k, w, f, r


_ZIG_K, _ZIG_W, _ZIG_F, _ZIG_R = _ziggurat_tables()


@numba.njit(inline="always")
def _exponential(st):  # pragma: no cover - compiled
    """A standard exponential number from the splitmix64 stream ``st`` by the ziggurat method
    (one 64-bit draw and no logarithm ~99% of the time; a log costs several draws' time)."""
    while True:
        bits = _splitmix(st) >> np.uint64(3)
        i = np.int64(bits & np.uint64(0xFF))
        bits >>= np.uint64(8)
        x = np.float64(bits) * _ZIG_W[i]
        if bits < _ZIG_K[i]:
            return x
        u = _unit(st)
        if i == 0:  # the tail beyond r: r plus an exponential
            return _ZIG_R - np.log1p(-u)
        if (_ZIG_F[i - 1] - _ZIG_F[i]) * u + _ZIG_F[i] < np.exp(-x):
            return x


@njit(nogil=True)
def _sample_classes(extra, spacings, uniforms, k, raw, lam, hot_p, now, dt, c_lo, c_n, c_region, c_vfix, c_wgroup,
                    cdf, r_start, r_n, r_a, r_b, r_mask, marks, out_t, out_v, out_g):  # pragma: no cover - compiled
    """The writes of every class c in one window [now, now + dt): k[c] of them.

    Raw classes: k[c] raw writes, each to a uniform page of the class at a uniform time. They
    come first. With ``spacings`` (n + 1 standard exponentials) they come as one run in (time,
    vCPU) order: their times drawn already sorted, each write given a class by a random
    permutation of the classes' counts (the same law as sorting independent uniform times per
    class); without, in no particular order (the caller sorts the whole batch anyway).
    Other classes: k[c] distinct pages of the class (uniform; ``marks`` remembers the ones taken
    and is left clear), each at its first-write time, an exponential of rate lam[c] truncated to
    the window (hot_p[c] = 1 - exp(-lam[c] dt)); in no particular order.
    Each page is placed in guest RAM as :func:`_place` places it, and each write's vCPU drawn
    by the class's rate split (``cdf`` row of its group), unless the class belongs to one vCPU.
    Random numbers come drawn by the caller (:func:`_sample_window`): ``uniforms``, three per write
    (page, vCPU, time); ``extra`` for the draws whose count is not fixed (the permutation,
    distinct pages drawn again after a repeat), continued past its end by a splitmix64 stream
    seeded from its last number. Returns the length of the ordered run of raw writes (0
    without ``spacings``)."""
    st = np.zeros(2, dtype=np.uint64)  # where in ``extra`` (see _uniform)
    nraw = 0
    for c in range(k.shape[0]):
        if raw[c]:
            nraw += k[c]
    cls = np.empty(out_t.shape[0], dtype=np.int64)
    # raw writes: sorted uniform times in [0, dt) from n + 1 exponential spacings
    j = 0
    nclasses = 0
    for c in range(k.shape[0]):
        if raw[c] and k[c]:
            nclasses += 1
            for _ in range(k[c]):
                cls[j] = c
                j += 1
    ordered = spacings.shape[0] > 0
    if ordered and nclasses > 1:
        for i in range(nraw - 1, 0, -1):  # Fisher-Yates: which class each time belongs to
            x = np.int64(_uniform(extra, st) * (i + 1))
            cls[i], cls[x] = cls[x], cls[i]
    total = 0.0
    if ordered:
        for i in range(nraw + 1):
            total += spacings[i]
    acc = 0.0
    for i in range(nraw):
        if ordered:
            acc += spacings[i]
            out_t[i] = now + min(np.int64(acc / total * dt), dt - 1)
        else:
            out_t[i] = now + np.int64(uniforms[3 * i + 2] * dt)
        out_g[i] = np.int64(uniforms[3 * i] * c_n[cls[i]])
    # other classes: distinct pages
    for c in range(k.shape[0]):
        kc, n = k[c], c_n[c]
        if raw[c] or kc == 0:
            continue
        j0 = j
        take = kc <= n - kc  # mark the pages taken, or (most of the class) the ones left out
        want = kc if take else n - kc
        for _ in range(want):
            r = np.int64(_uniform(extra, st) * n)
            while marks[r]:
                r = np.int64(_uniform(extra, st) * n)
            marks[r] = 1
            if take:
                out_g[j] = r
                cls[j] = c
                j += 1
        if not take:
            for r in range(n):
                if marks[r]:
                    marks[r] = 0
                else:
                    out_g[j] = r
                    cls[j] = c
                    j += 1
        for i in range(j0, j):
            if take:
                marks[out_g[i]] = 0
            tau = -np.log1p(-uniforms[3 * i + 2] * hot_p[c]) / lam[c]
            out_t[i] = now + min(np.int64(tau), dt - 1)
    # placement and writers
    for i in range(j):
        c = cls[i]
        reg = c_region[c]
        out_g[i] = r_start[reg] + _place(c_lo[c] + out_g[i], r_a[reg], r_b[reg], r_mask[reg], r_n[reg])
        if c_vfix[c] >= 0:
            out_v[i] = c_vfix[c]
        else:
            row = cdf[max(c_wgroup[c], 0)]
            u = uniforms[3 * i + 1]
            v = 0
            while row[v] <= u:  # the first vCPU whose cumulative share passes u
                v += 1
            out_v[i] = v
    if not ordered:
        return 0
    # equal times in the raw run: order by vCPU (rare; an insertion step each)
    for i in range(1, nraw):
        p = i
        while p > 0 and out_t[p] == out_t[p - 1] and out_v[p] < out_v[p - 1]:
            out_v[p], out_v[p - 1] = out_v[p - 1], out_v[p]
            out_g[p], out_g[p - 1] = out_g[p - 1], out_g[p]
            p -= 1
    return nraw


def _buckets(n: int, pattern: str, s: float) -> list[tuple[int, int, float]]:
    """Split ranks [0, n) into classes: (lo, hi, share of the region's writes).

    A Zipf region's ranks go into buckets ~1.5x wider each ([0, 1), [1, 2), [2, 3), [3, 4), [4, 6),
    ...), each bucket a class whose pages share its ranks' mean rate. Each bucket's share of the
    writes is exact (within ~1e-5), but spreading a bucket's rate evenly over its pages overstates
    the distinct pages written in a window (1 - exp(-r t) is concave in r): by up to 0.3% for the
    shipped Zipf workloads over windows of 0.01-10 s, ~0.7% at ``zipf_s`` 2, up to ~1.4% at 3,
    the largest accepted (measured against the exact per-rank sum, 2026-12-03)."""
    if pattern != "zipf" or n <= 1:
        return [(0, n, 1.0)]
    bounds = [0]
    b = 1
    while b < n:
        bounds.append(b)
        b = max(b + 1, int(b * 1.5))
    bounds.append(n)
    mass = np.array([_zipf_mass(a, z, s) for a, z in zip(bounds[:-1], bounds[1:])])
    mass /= mass.sum()
    return [(a, z, float(m)) for a, z, m in zip(bounds[:-1], bounds[1:], mass)]


def _zipf_mass(a: int, b: int, s: float) -> float:
    """sum_{r=a+1}^{b} r^-s (ranks are 1-based), exact for short ranges, else an integral."""
    if b - a <= 64:
        r = np.arange(a + 1, b + 1, dtype=float)
        return float(np.sum(r ** -s))
    if abs(s - 1.0) < 1e-12:
        return math.log((b + 0.5) / (a + 0.5))
    return ((b + 0.5) ** (1 - s) - (a + 0.5) ** (1 - s)) / (1 - s)
