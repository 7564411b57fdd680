"""``flash_attn`` and ``flash_attn_gather``: the flash-attn library (FA2, FA3 and FA4).

Two registry entries share this module:

* ``flash_attn`` reads our paged cache in place, through the first installed interface
  that serves the call, in the order FA4, FA3, FA2:

  - FA4 (``flash_attn.cute``, pip ``flash-attn-4``, sm90 and sm100): any page size,
    causal/window/softcap/sinks, DiffKV; no fp8 (its public call takes no descales in
    4.0.0b36); ``flash_attn_varlen_func`` with ``page_table`` and ``seqused_k`` for every
    call, decode included. Its kernels compile
    on the first call of each configuration (:mod:`flash_attn_jit` keeps count, and
    ``explain`` says when a call will compile). First because it is the one measured on
    our machine (H200, 2026-12-02): faster than our prefill, slower than our decode (the
    priority lists place the backend accordingly, :mod:`portattn.dispatch.priorities`).
  - FA3 (``flash_attn_interface``, Hopper): any page size, e4m3 q/K/V with descales, the
    differing K/V head sizes FA3 supports. Not measured (not installable here).
  - FA2 (``flash_attn``), whose paged kernels need pages that are multiples of 256 keys:
    ``flash_attn_with_kvcache`` when every sequence has one query (its decode path splits
    the keys over programs), else ``flash_attn_varlen_func``.
* ``flash_attn_gather`` serves any block size with FA2: it copies each sequence's blocks,
  up to ``max_seqlen_k`` rounded up to 256 keys, into a scratch cache of 256-key pages
  first. The copy costs a pass over the K/V bytes, so the priority lists place it after our
  Triton kernels: it is taken only when nothing faster serves.

The support rules are in :mod:`flash_attn_rules`, the argument mapping in
:mod:`flash_attn_calls`. ``why_not`` lists the reasons of every installed interface (and
says when FA3 or FA4 would serve a call but is missing). ``PORTATTN_FLASH_ATTN_INTERFACE``
= ``fa2``, ``fa3`` or ``fa4`` restricts ``flash_attn`` to one interface; unset means FA4,
then FA3, then FA2.

FA4 preconditions that portattn cannot check without reading the device: where a page is
exactly one of FA4's key tiles (for example block 128 with head size 128), FA4 loads the
whole last page of a sequence, so its slots past ``seq_len`` must hold finite values (a
zero-filled cache from ``PagedKVCache.allocate``, or stale keys, are fine; NaN is not:
0 x NaN = NaN). Pages a sequence does not use may hold anything. CUDA graphs: FA4 is
called with host ``max_seqlen_q``/``max_seqlen_k`` and does not synchronize, so a warmed-up
call can be captured; capture after the first call of a configuration (the compile).
``torch.compile`` reaches it through portattn's custom op, which runs it eagerly.
"""

from __future__ import annotations

from portattn import settings
from portattn.backends import flash_attn_jit
from portattn.backends.base import Backend, Plan
from portattn.backends.flash_attn_calls import (
    fa2_decode,
    fa2_varlen,
    fa3_paged,
    fa4_paged,
    gather_pages,
    one_query_per_sequence,
)
from portattn.backends.flash_attn_rules import (
    FA2_PAGE,
    FA3_CC_MAJOR,
    FA3_INSTALL_HINT,
    FA4_INSTALL_HINT,
    FA4_PAGED_CC_MAJORS,
    fa2_reasons,
    fa3_reasons,
    fa4_reasons,
    machine_reasons,
)

INTERFACE_VARIABLE = settings.FLASH_ATTN_INTERFACE.name
AUTO_ORDER = ("fa4", "fa3", "fa2")
INTERFACE_CHOICES = {"": AUTO_ORDER, "auto": AUTO_ORDER, "fa2": ("fa2",), "fa3": ("fa3",),
                     "fa4": ("fa4",)}
INTERFACE_NAMES = {"fa2": "FA2 (flash_attn_varlen_func)", "fa3": "FA3 (flash_attn_interface)",
                   "fa4": "FA4 (flash_attn.cute)"}
FA4_VARIANT = ("FA4 paged varlen (flash_attn.cute: page_table, seqused_k; JIT-compiled once "
               "per configuration)")


def allowed_interfaces() -> tuple[str, ...]:
    """The interfaces ``PORTATTN_FLASH_ATTN_INTERFACE`` allows, in the order tried (read
    when deciding)."""
    choice = settings.FLASH_ATTN_INTERFACE.value()  # InputError naming it when invalid
    return INTERFACE_CHOICES["auto" if choice is None else choice]


class FlashAttn(Backend):
    """flash-attn on our paged cache: FA4 or FA3 where installed and able (any block
    size), else FA2 (pages that are multiples of 256 keys)."""

    name = "flash_attn"
    summary = ("flash-attn paged kernels: FA4 (flash_attn.cute, sm90/sm100) or FA3 (any "
               "block size, fp8) where installed, else FA2 (block size a multiple of 256)")
    gather = False
    reads_max_lengths = True  # flash-attn's max_seqlen_q / max_seqlen_k are host ints

    def _interface_reasons(self, problem, caps) -> dict[str, list[str]]:
        """{interface: reasons} for the interfaces this backend may use here, in the order
        it tries them."""
        rules = {"fa4": lambda: fa4_reasons(problem, caps),
                 "fa3": lambda: fa3_reasons(problem, caps),
                 "fa2": lambda: fa2_reasons(problem, gather=self.gather)}
        usable = [i for i in allowed_interfaces() if i in caps.flash_attn_interfaces
                  and (i == "fa2" or not self.gather)]
        return {interface: rules[interface]() for interface in usable}

    def interface_for(self, problem, caps) -> str | None:
        """The interface :meth:`plan` takes for ``problem`` (None when none serves)."""
        if machine_reasons(problem, caps):
            return None
        found = self._interface_reasons(problem, caps)
        return next((i for i, reasons in found.items() if not reasons), None)

    def why_not(self, problem, caps) -> list[str]:
        reasons = machine_reasons(problem, caps)
        if reasons:
            return reasons
        found = self._interface_reasons(problem, caps)
        if any(not r for r in found.values()):
            return []
        installed = caps.flash_attn_interfaces
        if "fa2" not in found:
            what = (f"turned off by {INTERFACE_VARIABLE}" if "fa2" in installed
                    else "not installed")
            reasons.append(f"flash_attn_gather needs flash-attn 2 (flash_attn_varlen_func), "
                           f"{what}" if self.gather else
                           f"flash-attn's FA2 interface (flash_attn_varlen_func) is {what}")
        if not self.gather:
            for interface in ("fa3", "fa4"):
                if interface in installed and interface not in found:
                    reasons.append(f"{INTERFACE_NAMES[interface]} is turned off by "
                                   f"{INTERFACE_VARIABLE}")
        for interface_reasons in found.values():
            reasons += interface_reasons
        if not self.gather:
            reasons += self._install_hints(problem, caps)
        return reasons

    @staticmethod
    def _install_hints(problem, caps) -> list[str]:
        """Interfaces that ``PORTATTN_FLASH_ATTN_INTERFACE`` allows but are not installed:
        how to install those that would serve this call here; where the variable names
        one that would not, that it is missing and why it would not serve."""
        allowed = allowed_interfaces()
        named = allowed != AUTO_ORDER  # the variable asks for this one interface
        installed = caps.flash_attn_interfaces
        cc = caps.compute_capability
        hints = []
        for interface, rules, majors, install in (
                ("fa4", fa4_reasons, FA4_PAGED_CC_MAJORS, FA4_INSTALL_HINT),
                ("fa3", fa3_reasons, (FA3_CC_MAJOR,), FA3_INSTALL_HINT)):
            if interface in installed or interface not in allowed:
                continue
            why = [] if cc is not None and cc[0] in majors else \
                [f"it pages on compute capability {' / '.join(f'{m}.x' for m in majors)} "
                 "only"]
            why = why or rules(problem, caps)
            if not why:
                hints.append(f"{INTERFACE_NAMES[interface]} would serve this call but is not "
                             f"installed: {install}")
            elif named:
                hints.append(f"{INTERFACE_NAMES[interface]}, which {INTERFACE_VARIABLE} asks "
                             f"for, is not installed (nor would it serve this call: "
                             f"{'; '.join(why)})")
        return hints

    def unavailable(self, caps) -> list[str]:
        """Machine-level reasons only: asks about a plain fp16 problem on 256-key blocks
        (the page size FA2 reads directly)."""
        from portattn.dispatch.problem import Problem

        plain = Problem.make(device_type=caps.device_type, dtype="float16", block_size=FA2_PAGE)
        return self.why_not(plain, caps)

    def plan(self, problem, caps) -> Plan:
        """The interface (FA4, then FA3, then FA2) and call; ``problem``/``caps`` may be None
        in tests that call ``run`` directly (then FA2)."""
        interface = None if problem is None or caps is None else \
            self.interface_for(problem, caps)
        if interface == "fa4":
            return Plan(self.name, FA4_VARIANT, {
                "interface": "fa4",
                "_fa4_configuration": flash_attn_jit.plan_configuration(problem, caps.arch)})
        if interface == "fa3":
            return Plan(self.name, "FA3 paged (flash_attn_with_kvcache, page_table)",
                        {"interface": "fa3"})
        prefix = f"gather into {FA2_PAGE}-key pages + " if self.gather else ""
        return Plan(self.name, prefix + "FA2 paged (with_kvcache for one query per "
                    "sequence, else varlen)", {"interface": "fa2"})

    def notes(self, problem, plan, options) -> list[str]:
        if plan.params.get("interface") != "fa4":
            return []
        planned = plan.params.get("_fa4_configuration")
        configuration = None if planned is None or options is None else \
            flash_attn_jit.call_configuration(planned, options.softcap, options.sinks)
        return [flash_attn_jit.compile_note(configuration)]

    def run(self, q, cache, metadata, options, out, plan) -> None:
        max_q, max_k = (max(1, n) for n in metadata.max_lengths())
        interface = plan.params.get("interface")
        if interface == "fa4":
            out.copy_(fa4_paged(q, cache, metadata, options, max_q, max_k))
            planned = plan.params.get("_fa4_configuration")
            if planned is not None:
                flash_attn_jit.compiled.record(flash_attn_jit.call_configuration(
                    planned, options.softcap, options.sinks))
            return
        if interface == "fa3":
            out.copy_(fa3_paged(q, cache, metadata, options, max_q))
            return
        key_cache, value_cache, block_table = cache.key_cache, cache.value_cache, \
            metadata.block_table
        if self.gather:
            key_cache, value_cache, block_table = gather_pages(cache, block_table, max_k,
                                                               FA2_PAGE)
        if one_query_per_sequence(q, metadata, max_q):
            result = fa2_decode(q, key_cache, value_cache, block_table, metadata, options)
        else:
            result = fa2_varlen(q, key_cache, value_cache, block_table, metadata, options,
                                max_q, max_k)
        out.copy_(result)


class FlashAttnGather(FlashAttn):
    """FA2 for any block size: copy the visible pages into 256-key pages first."""

    name = "flash_attn_gather"
    summary = "flash-attn 2 after copying K/V into 256-key pages (any block size; slower)"
    slow_path = "flash-attn 2 after copying every visible page into 256-key pages"
    gather = True
