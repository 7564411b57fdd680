"""``flash_attn`` and ``flash_attn_gather``: the flash-attn library (FA2 and FA3).

Two registry entries share this module:

* ``flash_attn`` reads our paged cache in place. It takes FA3 (``flash_attn_interface``)
  when that is installed and serves the call: any page size, e4m3 q/K/V with descales, the
  differing K/V head sizes FA3 supports. Else FA2 (``flash_attn``), whose paged kernels
  need pages that are multiples of 256 keys: ``flash_attn_with_kvcache`` when every
  sequence has one query (its decode path splits the keys over programs), else
  ``flash_attn_varlen_func``.
* ``flash_attn_gather`` serves any block size with FA2: it copies each sequence's blocks,
  up to ``max_seqlen_k`` rounded up to 256 keys, into a scratch cache of 256-key pages
  first. The copy costs a pass over the K/V bytes, so the priority lists place it after our
  Triton kernels: it is taken only when nothing faster serves.

The support rules are in :mod:`flash_attn_rules`, the argument mapping in
:mod:`flash_attn_calls`. ``why_not`` lists the reasons of every installed interface (and
says when FA3 would serve a call but is missing). ``PORTATTN_FLASH_ATTN_INTERFACE=fa2``
(or ``fa3``) restricts ``flash_attn`` to one interface; unset means FA3 first.
"""

from __future__ import annotations

import os

from portattn.backends.base import Backend, Plan
from portattn.backends.flash_attn_calls import (fa2_decode, fa2_varlen, fa3_paged,
                                                gather_pages, one_query_per_sequence)
from portattn.backends.flash_attn_rules import (FA2_PAGE, FA3_CC_MAJOR, FA3_INSTALL_HINT,
                                                fa2_reasons, fa3_reasons, machine_reasons)

INTERFACE_VARIABLE = "PORTATTN_FLASH_ATTN_INTERFACE"
INTERFACE_CHOICES = {"": ("fa3", "fa2"), "auto": ("fa3", "fa2"), "fa2": ("fa2",),
                     "fa3": ("fa3",)}


def allowed_interfaces() -> tuple[str, ...]:
    """The interfaces ``PORTATTN_FLASH_ATTN_INTERFACE`` allows (read when deciding)."""
    raw = os.environ.get(INTERFACE_VARIABLE, "")
    choice = INTERFACE_CHOICES.get(raw.strip().lower())
    if choice is None:
        raise ValueError(f"{INTERFACE_VARIABLE}={raw!r} is not valid; accepted values: unset "
                         "or auto (FA3 first, then FA2), fa2, fa3")
    return choice


class FlashAttn(Backend):
    """flash-attn on our paged cache: FA3 where installed and able, else FA2 (pages that
    are multiples of 256 keys)."""

    name = "flash_attn"
    summary = ("flash-attn paged kernels: FA3 (any block size, fp8) where installed, "
               "else FA2 (block size a multiple of 256)")
    gather = False

    def _interface_reasons(self, problem, caps) -> dict[str, list[str]]:
        """{interface: reasons} for the interfaces this backend may use here."""
        usable = [i for i in allowed_interfaces() if i in caps.flash_attn_interfaces]
        found: dict[str, list[str]] = {}
        if "fa3" in usable and not self.gather:
            found["fa3"] = fa3_reasons(problem, caps)
        if "fa2" in usable:
            found["fa2"] = fa2_reasons(problem, gather=self.gather)
        return found

    def why_not(self, problem, caps) -> list[str]:
        reasons = machine_reasons(problem, caps)
        if reasons:
            return reasons
        found = self._interface_reasons(problem, caps)
        if any(not r for r in found.values()):
            return []
        if "fa2" not in found:
            off = "fa2" in caps.flash_attn_interfaces
            what = (f"turned off by {INTERFACE_VARIABLE}" if off else "not installed")
            reasons.append(f"flash_attn_gather needs flash-attn 2 (flash_attn_varlen_func), "
                           f"{what}" if self.gather else
                           f"flash-attn's FA2 interface (flash_attn_varlen_func) is {what}")
        if "fa3" in caps.flash_attn_interfaces and "fa3" not in allowed_interfaces() \
                and not self.gather:
            reasons.append(f"FA3 (flash_attn_interface) is turned off by {INTERFACE_VARIABLE}")
        for interface_reasons in found.values():
            reasons += interface_reasons
        cc = caps.compute_capability
        if (not self.gather and "fa3" not in caps.flash_attn_interfaces and cc is not None
                and cc[0] == FA3_CC_MAJOR and not fa3_reasons(problem, caps)):
            reasons.append(f"FA3 (flash_attn_interface) would serve this call but is not "
                           f"installed: {FA3_INSTALL_HINT}")
        return reasons

    def unavailable(self, caps) -> list[str]:
        """Machine-level reasons only: asks about a plain fp16 problem on 256-key blocks
        (the page size FA2 reads directly)."""
        from portattn.dispatch.problem import Problem

        plain = Problem.make(device_type=caps.device_type, dtype="float16", block_size=FA2_PAGE)
        return self.why_not(plain, caps)

    def plan(self, problem, caps) -> Plan:
        """The interface (FA3 first) and call; ``problem``/``caps`` may be None in tests
        that call ``run`` directly (then FA2)."""
        if problem is not None and caps is not None and \
                self._interface_reasons(problem, caps).get("fa3") == []:
            return Plan(self.name, "FA3 paged (flash_attn_with_kvcache, page_table)",
                        {"interface": "fa3"})
        prefix = f"gather into {FA2_PAGE}-key pages + " if self.gather else ""
        return Plan(self.name, prefix + "FA2 paged (with_kvcache for one query per "
                    "sequence, else varlen)", {"interface": "fa2"})

    def run(self, q, cache, metadata, options, out, plan) -> None:
        max_q, max_k = (max(1, n) for n in metadata.max_lengths())
        if plan.params.get("interface") == "fa3":
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
    gather = True
