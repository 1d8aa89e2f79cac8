"""sglang plugin entry point (group ``sglang.srt.plugins``): ``register()``.

sglang calls ``register()`` in the launcher and again in every scheduler,
detokenizer and DP-controller process (``load_plugins``), then applies the hooks.
Everything OSCAR changes in sglang 0.5.23 is the attention-backend registry entry plus the
hooks of :data:`HOOKS` (target, hook, kind), the one list ``register()`` installs (with, on
sglang's CPU engine only, the workarounds of ``oscar_sglang.cpu.parallel.HOOKS``). sglang's
``HookRegistry.apply_hooks`` logs and swallows a hook that fails to apply, so
:func:`check_hooks_applied` refuses to serve ``--oscar`` with part of it missing (at launch and
again when a scheduler builds the backend); a test checks every target's signature against its
hook's, so an sglang change breaks a test, not a server.

The hooks only act when the ``oscar`` attention backend is selected; otherwise
sglang behaves exactly as without this package.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from oscar_sglang import health
from oscar_sglang.calib.rotations import fingerprint_from_hf_config
from oscar_sglang.kernels.codec import CacheLayout
from oscar_sglang.settings import BACKEND_NAME, OscarError, check_server_args, is_enabled, read_settings
from oscar_sglang.sizing import oscar_cell_size, page_size_for

logger = logging.getLogger(__name__)

_SA = "sglang.srt.server_args.ServerArgs"
_KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_POOLCFG = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
_COMMON = "sglang.srt.mem_cache.common"
_REQS = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool"
_BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch"
_TREE = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache"
_ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"


# ------------------------------------------------------------------ helpers
def _hf_config(server_args):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        server_args.model_path, trust_remote_code=server_args.trust_remote_code, revision=server_args.revision
    )


def _kv_heads(kvc) -> int:
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return kvc.model_config.get_num_kv_heads(parallel.attn_tp_size, parallel.attn_dcp_size)


def _widths(bits: tuple[int, ...]) -> str:
    """``2`` when uniform, else the per-layer list."""
    return str(bits[0]) if len(set(bits)) == 1 else ",".join(map(str, bits))


def _oscar_pool(allocator):
    from oscar_sglang.pool import OscarKVPool

    pool = allocator.get_kvcache()
    return pool if isinstance(pool, OscarKVPool) else None


# ------------------------------------------------------------------ hooks
AFTER, AROUND = "after", "around"  # sglang's HookType values
HOOKS = (  # (target, OscarPlugin method, kind)
    (f"{_SA}.add_cli_args", "add_cli_args", AFTER),
    (f"{_SA}.from_cli_args", "from_cli_args", AFTER),
    (f"{_SA}.resolve_once", "check_before_launch", AFTER),
    ("sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility", "resolve_for_oscar", AFTER),
    (f"{_KVC}._build_token_to_kv_pool", "build_token_to_kv_pool", AROUND),
    (f"{_KVC}._build_token_to_kv_pool_allocator", "build_allocator", AROUND),
    (f"{_POOLCFG}.__init__", "size_cells", AFTER),
    (f"{_REQS}.free_rows", "on_free_request_rows", AFTER),
    (f"{_COMMON}.match_kv_cache", "match_with_windows", AROUND),
    (f"{_BATCH}.prepare_for_extend", "extend_windows", AROUND),
    (f"{_BATCH}.prepare_for_decode", "decode_windows", AFTER),
    (f"{_TREE}.checkpoint", "attach_windows", AFTER),
    (f"{_ADDER}._get_running_request_total_token_offset", "running_window_offset", AROUND),
    (f"{health.STATE}._add_memory_usage", "add_kv_health", AFTER),
    (f"{_TREE}._evict", "count_evicted", AFTER),
)


class OscarPlugin:
    """The plugin in one process: its hooks (the methods :data:`HOOKS` names) and its state: the
    settings and rotations each rotations file gave (read once), the OSCAR pool this process
    serves from, and the tokens the radix cache evicted. ``register()`` makes one per process."""

    def __init__(self):
        self._settings: dict[tuple, tuple] = {}
        self.pool = None  # the OscarKVPool built in this process (a scheduler's)
        self.evicted_tokens = 0

    def hooks(self):
        """(target, bound method, kind) of every hook."""
        return [(target, getattr(self, name), kind) for target, name, kind in HOOKS]

    def settings(self, server_args, hf_config):
        """The validated settings and rotations; the file is read once per path, model and device."""
        path = check_server_args(server_args, hf_config)
        stat = Path(path).stat() if Path(path).is_file() else None
        key = (path, stat and (stat.st_size, stat.st_mtime_ns), fingerprint_from_hf_config(hf_config),
               getattr(server_args, "device", None))
        if key not in self._settings:
            self._settings[key] = read_settings(path, hf_config, key[-1])
        return self._settings[key]

    def create_backend(self, model_runner):
        from oscar_sglang.backend import OscarAttnBackend

        check_hooks_applied()
        settings, rot = self.settings(model_runner.server_args, model_runner.model_config.hf_config)
        return OscarAttnBackend(model_runner, settings, rot.key, rot.value)

    def add_cli_args(self, result, parser: argparse.ArgumentParser):
        parser.add_argument(
            "--oscar",
            metavar="ROTATIONS",
            default=None,
            help="Serve with the OSCAR rotated 2-4-bit KV cache using this rotations file "
            "(from `python -m oscar_sglang.calib`; it holds the bit widths). Same as --attention-backend oscar "
            "--quantization-param-path ROTATIONS.",
        )

    def from_cli_args(self, server_args, cls, args: argparse.Namespace):
        path = getattr(args, "oscar", None)
        if path:
            server_args.attention_backend = BACKEND_NAME
            server_args.quantization_param_path = path
        return server_args

    def check_before_launch(self, result, server_args):
        """Refuse bad configurations in the launching process, before anything starts."""
        if is_enabled(server_args):
            check_hooks_applied()
            self.settings(server_args, _hf_config(server_args))

    def resolve_for_oscar(self, result, server_args):
        """Decode is graph-capturable (fixed-size metadata buffers); extend is not (its chunk metadata
        has data-dependent shapes): prefill runs eagerly. Window rows live in whole KV pages: the
        page size must hold one (``sizing.page_size_for``)."""
        from sglang.srt.arg_groups import attention_hook as ah

        if ah.resolved_view(server_args).attention_backend != BACKEND_NAME:
            return
        view = ah.resolving_view(server_args)
        settings, _ = self.settings(server_args, _hf_config(server_args))
        page = page_size_for(settings.rule, settings.layouts, view.page_size)
        if page != view.page_size:
            logger.info("OSCAR: page size %d (window rows live in whole KV pages)", page)
        cfg = ah.with_phase(view.cuda_graph_config, ah.Phase.PREFILL, backend=ah.Backend.DISABLED)
        ah.declare_resolution(server_args, "oscar_resolution", cuda_graph_config=cfg, page_size=page)

    def build_token_to_kv_pool(self, original, kvc, *, sizes, is_dsa_model, is_dsv4_model, req_to_token_pool):
        if not is_enabled(kvc.server_args):
            return original(kvc, sizes=sizes, is_dsa_model=is_dsa_model, is_dsv4_model=is_dsv4_model,
                            req_to_token_pool=req_to_token_pool)
        from sglang.srt.runtime_context import get_exec

        from oscar_sglang.pool import OscarKVPool

        if kvc.use_mla_backend or is_dsa_model or is_dsv4_model:
            raise OscarError("--oscar cannot serve MLA/DSA models: they have no per-head K/V to rotate.")
        if kvc.is_hybrid_swa or kvc.mambaish_config is not None:
            raise OscarError("--oscar serves full-attention models only (this one is hybrid SWA/linear/mamba).")
        settings, _ = self.settings(kvc.server_args, kvc.model_config.hf_config)
        pool = OscarKVPool(
            sizes.max_total_num_tokens,
            kvc.pool_page_size,
            kvc.model_config.dtype,
            _kv_heads(kvc),
            kvc.model_config.head_dim,
            kvc.layer_info.num_effective_layers,
            kvc.device,
            layouts=settings.layouts,
            rule=settings.rule,
            request_rows=req_to_token_pool.req_to_token.shape[0],
            enable_memory_saver=get_exec().features.enable_memory_saver,
            start_layer=kvc.layer_info.start_layer,
            end_layer=kvc.layer_info.end_layer,
        )
        self.pool = pool
        logger.info(
            "OSCAR KV pool: %d tokens, %.3f bits per element (K bits %s, V bits %s); full-precision sinks %d and "
            "blocks of %d tokens in pages of %d slots (%d window rows each), taken from the pool as requests need them",
            sizes.max_total_num_tokens, settings.layouts.bits_per_element, _widths(settings.key_bits),
            _widths(settings.value_bits), settings.sink, settings.block, kvc.pool_page_size, pool.per_page)
        return pool

    def build_allocator(self, original, kvc, *, sizes, token_to_kv_pool, is_dsv4_model, req_to_token_pool,
                         token_to_kv_pool_allocator):
        from oscar_sglang.allocator import OscarTokenToKVPoolAllocator
        from oscar_sglang.pool import OscarKVPool

        if token_to_kv_pool_allocator is not None or not isinstance(token_to_kv_pool, OscarKVPool):
            return original(kvc, sizes=sizes, token_to_kv_pool=token_to_kv_pool, is_dsv4_model=is_dsv4_model,
                            req_to_token_pool=req_to_token_pool, token_to_kv_pool_allocator=token_to_kv_pool_allocator)
        from sglang.srt.runtime_context import get_disagg

        return OscarTokenToKVPoolAllocator(
            sizes.max_total_num_tokens, kvc.pool_page_size, kvc.kv_cache_dtype, kvc.device, token_to_kv_pool,
            need_sort=get_disagg().disaggregation_mode in ("decode", "prefill"))

    def size_cells(self, result, poolcfg, kvc):
        """Charge the true bytes per token (packed rows); window rows take whole pages of the same pool."""
        if not is_enabled(kvc.server_args) or poolcfg._cell_size == 0:
            return
        settings, _ = self.settings(kvc.server_args, kvc.model_config.hf_config)
        lay, first = settings.layouts, kvc.layer_info.start_layer
        span = slice(first, first + kvc.layer_info.num_effective_layers)  # this rank's layers (pipeline parallel)
        poolcfg._cell_size = oscar_cell_size(CacheLayout(lay.key[span], lay.value[span]).token_row_bytes, _kv_heads(kvc))

    def on_free_request_rows(self, result, req_to_token_pool, indices):
        if self.pool is not None:
            for row in indices:
                self.pool.store.release_row(int(row))

    def match_with_windows(self, original, req, tree_cache, token_ids=None, *, cow_mamba=False, max_prefix_len=None):
        """A prefix hit is used only up to where the window rows a query there reads are attached
        (``WindowStore.usable_prefix``: at least the block start, with the sinks): the tokens beyond it
        are recomputed, which under the position rule gives exactly what a cold run gives. The request
        then keeps the rows of the full match's block, so the next request that leaves the cache there
        hits all of it (``begin_extend(snapshot_end=...)``)."""
        result = original(req, tree_cache, token_ids, cow_mamba=cow_mamba, max_prefix_len=max_prefix_len)
        pool = _oscar_pool(tree_cache.token_to_kv_pool_allocator)
        if pool is None:
            return result
        pool.store.snapshot_at.pop(req, None)
        if req.prefix_len == 0:
            return result
        usable = pool.store.usable_prefix(tree_cache.prefix_device_indices(req))
        if usable < req.prefix_len:
            pool.store.snapshot_at[req] = req.prefix_len
            limit = usable if max_prefix_len is None else min(usable, max_prefix_len)
            result = original(req, tree_cache, token_ids, cow_mamba=cow_mamba, max_prefix_len=limit)
        return result

    def extend_windows(self, original, batch):
        """Pin the window rows each new request's prefix hit reads (sglang's allocation below may evict
        cached rows), then move every request's window table to this extend."""
        pool = _oscar_pool(batch.token_to_kv_pool_allocator)
        if pool is None:
            return original(batch)
        store = pool.store
        hits = {}
        for req in batch.reqs:
            a, row = req.prefix_len, req.kv.req_pool_idx
            if a and (row is None or store.row_len[row] != a):
                sinks, block = store.rule.window(a)
                ids = store.lookup(batch.tree_cache.prefix_device_indices(req)[[*sinks, *block]])
                if (ids < 0).any():
                    raise RuntimeError(f"OSCAR: request {req.rid} was admitted on a {a}-token prefix whose window rows "
                                       "are gone (the match validates them)")
                hits[id(req)] = store.pin(ids)
        try:
            result = original(batch)
        except BaseException:
            for ids in hits.values():
                store.unpin(ids)
            raise
        for req, a, n in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            end = store.snapshot_at.get(req)
            store.begin_extend(req.kv.req_pool_idx, a, a + n, hits.get(id(req)), end)
            if end is not None and end <= a + n:  # kept (or passed) in this chunk
                del store.snapshot_at[req]
        return result

    def decode_windows(self, result, batch):
        pool = _oscar_pool(batch.token_to_kv_pool_allocator)
        if pool is not None:
            for req, n in zip(batch.reqs, batch.seq_lens_cpu.tolist()):
                pool.store.begin_decode(req.kv.req_pool_idx, n - 1)

    def attach_windows(self, result, tree, req, *, up_to: int, **kwargs):
        """sglang cached the request's tokens: the tree's slots there get the rows it holds."""
        pool = _oscar_pool(tree.token_to_kv_pool_allocator)
        row = req.kv.req_pool_idx
        if pool is not None and row is not None:
            slots = tree.req_to_token_pool.req_to_token[row]
            pool.store.attach(row, lambda positions: slots[positions], req.kv.cache_protected_len)

    def running_window_offset(self, original, adder, req) -> float:
        """Each running request's expected decode tokens also take window rows (up to a block)."""
        tokens = original(adder, req)
        allocator = adder.token_to_kv_pool_allocator
        return tokens + allocator.window_growth_slots(tokens) if _oscar_pool(allocator) is not None else tokens

    def add_kv_health(self, result, controller, state: dict) -> None:
        state["kv_health"] = health.kv_health(controller.scheduler, self.evicted_tokens)

    def count_evicted(self, result, tree, *args, **kwargs) -> None:
        self.evicted_tokens += int(result.num_tokens_evicted)


def register() -> None:
    from sglang.srt.arg_groups.choices import add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME in ATTENTION_BACKENDS:  # registered already in this process
        return
    plugin = OscarPlugin()
    register_attention_backend(BACKEND_NAME)(plugin.create_backend)
    add_attention_backend_choices([BACKEND_NAME])
    for target, fn, kind in plugin.hooks() + _cpu_hooks():
        HookRegistry.register(target, fn, HookType(kind))


def _cpu_hooks() -> list:
    """The workarounds of ``oscar_sglang.cpu.parallel`` in a process running sglang's CPU engine, else none."""
    from sglang.srt.utils import is_cpu

    from oscar_sglang.cpu import parallel

    return list(parallel.HOOKS) if is_cpu() else []


def check_hooks_applied() -> None:
    """Raise ``OscarError`` unless sglang applied every hook of :data:`HOOKS` (and the CPU engine's)
    in this process."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = sorted({target for target, _, _ in [*HOOKS, *_cpu_hooks()]} - HookRegistry._patched)
    if missing:
        raise OscarError(f"sglang did not apply {len(missing)} of OSCAR's hooks ({', '.join(missing)}; "
                         "its log says why): this sglang is not the 0.5.23 release oscar-sglang supports")
