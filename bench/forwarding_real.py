"""The forwarding benchmark's real run: separate ``ps-node serve`` processes, side by side with the simulation.

``python bench/forwarding.py --real`` calls :func:`run_real`. It starts anvil with the contracts, 3 model nodes
(torch engine, the quick model, one CPU thread each, free: price 0) and 3 relays as separate processes
(``node.testing.ProcessNetwork``, registered and staked), and one ``Client`` per policy. The same arrivals (Poisson,
Zipf(1.1) shared-prefix prompts, the same prompt and reply lengths) then go through the real network and through
the simulation at the same scale (3 nodes), calibrated on the same engine with one thread, with the network's own
measured time added per request. Each policy's run uses documents of its own (same lengths, other text), so no
policy inherits another's cache.

The machine's 2 cores are shared by the 3 engines, the relays, the client and anything else running: the real
nodes are not independent machines, which the simulation assumes; the table shows how far that moves the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forwarding import Calibration, Request, Workload

#: Model nodes and relays of the real run.
REAL_NODES = 3
REAL_RELAYS = 3
#: Onion paths and relays per path of the real run's client: n=4 cloves over one relay each (any 3 rebuild the
#: request); the relay work per reply token is what the 2 cores can afford next to 3 engines.
REAL_PATHS = 4
REAL_HOPS = 1
#: Requests per block: the policies take turns block by block.
REAL_BLOCK = 25
#: Longest wait for one request, seconds.
REQUEST_TIMEOUT_S = 120.0
#: The request a task is sending (set per task), so the client's route callback can say where it went.
_CURRENT: contextvars.ContextVar[int] = contextvars.ContextVar("request")


def _line(rng: random.Random) -> str:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a:02d}+{b:02d}={a + b:02d}\n"


def _text_of(tokens: int, rng: random.Random, encode: Callable[[str], Sequence[int]]) -> str:
    """Addition lines (what the quick model learned) until the text is about ``tokens`` long."""
    text = ""
    while len(encode(text)) < tokens:
        text += "".join(_line(rng) for _ in range(8))
    return text


def _stats(latencies: list[float], ttfts: list[float], cached: int, prompt: int) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "mean_s": statistics.fmean(latencies),
        "p50_s": statistics.median(latencies),
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "ttft_mean_s": statistics.fmean(ttfts),
        "cache_hit_rate": cached / max(1, prompt),
    }


async def _one(
    client: Any,
    request: Any,
    scheduled: float,
    results: list[tuple[float, float, int, int, int] | None],
    i: int,
    info: Callable[[str], None],
) -> None:
    """Send one request at its scheduled time (open loop: latency counts from then, however late it went)."""
    _CURRENT.set(i)
    await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
    first = 0.0
    last = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async for delta in client.stream(request):
                if not first:
                    first = time.perf_counter() - scheduled
                last = delta
    except Exception as exc:  # counted: a failed request is part of the result, not a crash
        info(f"real run: request {i} failed ({type(exc).__name__})")
        return
    if last is not None:
        results[i] = (
            time.perf_counter() - scheduled,
            first,
            last.cached_tokens,
            last.prompt_tokens,
            last.completion_tokens,
        )


def run_real(
    *,
    policies: Sequence[str],
    load: float,
    count: int,
    seed: int,
    info: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The real multi-process run and the simulation at the same scale; returns the JSON section."""
    import torch
    from forwarding import MODELS, Workload, measure_calibration

    from ledger import Anvil, AnvilConfig, RegistryParams, deploy_all, dev_account
    from node.client import load_tokenizer
    from node.inference import ensure_model, read_info
    from node.inference._training import QUICK
    from node.testing import NodeSpec, ProcessNetwork

    workload = Workload("real", 24, (192, 768), (16, 48), (8, 24), 1 << 20)
    model_dir = ensure_model(QUICK, MODELS)
    model_info = read_info(model_dir)
    assert model_info is not None
    model = f"{model_info.name}@{model_info.revision}"
    encode = load_tokenizer(model_dir)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each node runs (OMP_NUM_THREADS=1)
    try:
        cal = measure_calibration()
    finally:
        torch.set_num_threads(threads)
    cal = replace(cal, source="measured now on the quick model (torch, CPU, 1 thread), before the nodes started")
    info(f"real run: calibration {cal}")

    specs = [
        NodeSpec(name=f"model-{i + 1}", role="model", account_index=1 + i, stake_wei=2 * 10**18)
        for i in range(REAL_NODES)
    ] + [
        NodeSpec(name=f"relay-{i + 1}", role="relay", account_index=1 + REAL_NODES + i, stake_wei=2 * 10**17)
        for i in range(REAL_RELAYS)
    ]
    with tempfile.TemporaryDirectory(prefix="ps-forwarding-real-") as tmp:
        state = Path(tmp)
        anvil = Anvil(AnvilConfig(accounts=len(specs) + 2)).start()
        network: ProcessNetwork | None = None
        try:
            deployment = state / "deployment.json"
            deploy_all(anvil.web3(), dev_account(0), RegistryParams(), path=deployment)
            network = ProcessNetwork(
                rpc_url=anvil.rpc_url,
                deployment=deployment,
                state_root=state / "nodes",
                nodes=specs,
                model_dir=model_dir,
                extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PS_LOG_LEVEL": "ERROR"},
            )
            started = time.perf_counter()
            network.start()
            up = time.perf_counter() - started
            info(f"real run: {REAL_NODES} model nodes and {REAL_RELAYS} relays up in {up:.0f} s")
            return asyncio.run(
                _measure(
                    rpc_url=anvil.rpc_url,
                    deployment=deployment,
                    db=f"sqlite:///{state / 'client-index.sqlite'}",
                    model=model,
                    encode=encode,
                    workload=workload,
                    cal=cal,
                    policies=policies,
                    load=load,
                    count=count,
                    seed=seed,
                    info=info,
                )
            )
        finally:
            if network is not None:
                network.stop()
            anvil.stop()


async def _measure(
    *,
    rpc_url: str,
    deployment: Path,
    db: str,
    model: str,
    encode: Callable[[str], Sequence[int]],
    workload: Workload,
    cal: Calibration,
    policies: Sequence[str],
    load: float,
    count: int,
    seed: int,
    info: Callable[[str], None],
) -> dict[str, Any]:
    from forwarding import Calibration, Scenario, make_requests, simulate

    from node.client import Client, ClientConfig
    from node.client._registry import RegistryDirectory
    from node.overlay import CompletionRequest

    directory = RegistryDirectory(rpc_url, deployment=deployment, db_url=db)

    def client_for(policy: str, destinations: dict[int, str] | None = None) -> Any:
        """A client; with ``destinations``, it records where each request (by index) was last routed."""

        def routed(route: Any) -> None:
            index = _CURRENT.get(-1)
            if destinations is not None and index >= 0:
                destinations[index] = route.destination.operator

        config = ClientConfig(models=(model,), policy=policy, paths=REAL_PATHS, hops=REAL_HOPS)
        return Client(directory, config, tokenizer=encode, reputation=directory.reputation, on_route=routed)

    # The network's own time per request (paths, sealing, relays, the reply frames), idle: a one-token reply's
    # TTFT minus the engine's prefill of it.
    probe_rng = random.Random(seed + 99)
    overheads = []
    async with client_for("round_robin") as client:
        model_id = (await client.resolve(model)).model_id
        for i in range(3 * REAL_NODES + 6):
            prompt = _text_of(64, probe_rng, encode)
            sent = time.perf_counter()
            await asyncio.wait_for(
                client.complete(CompletionRequest(model=model_id, prompt=prompt, max_tokens=4, temperature=0.0)),
                REQUEST_TIMEOUT_S,
            )
            if i >= REAL_NODES:  # the first round warms each engine
                tokens = len(encode(prompt))
                engine = (
                    cal.prefill_fixed_s
                    + cal.prefill_per_token_s * tokens
                    + 3 * (cal.decode_fixed_s + cal.decode_per_seq_s)
                )
                overheads.append(max(0.0, time.perf_counter() - sent - engine))
    overhead = statistics.median(overheads)
    info(f"real run: network time per request (idle, median of {len(overheads)}): {overhead * 1e3:.1f} ms")

    def materialize(arrivals: Sequence[Request], salt: int) -> tuple[list[Request], list[str]]:
        """Prompts for ``arrivals`` over documents of their own (``salt``): the same lengths, other text, so no
        run inherits another's cache; the requests get the prompts' real token counts."""
        doc_rng = random.Random(seed * 1000 + salt)
        lengths: dict[int, int] = {}
        for r in arrivals:
            lengths.setdefault(r.doc, r.doc_blocks * 16)
        texts = {}
        for d, n in sorted(lengths.items()):
            text = _text_of(n, doc_rng, encode)
            while len(encode(text)) > n and text.count("\n") > 1:  # cut to whole lines of about the length
                text = text[: text.rstrip("\n").rfind("\n") + 1]
            texts[d] = text
        suffix_rng = random.Random(seed + 7)
        prompts, requests = [], []
        for r in arrivals:
            suffix = _text_of(r.prompt_tokens - r.doc_blocks * 16, suffix_rng, encode)
            a, b = suffix_rng.randrange(100), suffix_rng.randrange(100)
            prompt = texts[r.doc] + suffix + f"{a:02d}+{b:02d}="
            prompts.append(prompt)
            doc_tokens = len(encode(texts[r.doc]))
            requests.append(replace(r, doc_blocks=doc_tokens // 16, prompt_tokens=len(encode(prompt))))
        return requests, prompts

    async def send(
        client: Any,
        requests: Sequence[Request],
        prompts: Sequence[str],
        indexes: Sequence[int],
        results: list[tuple[float, float, int, int, int] | None],
    ) -> float:
        """Send ``indexes`` at their arrival times counted from the first of them; returns when it started."""
        start = time.perf_counter() + 0.2
        offset = requests[indexes[0]].arrival
        await asyncio.gather(
            *(
                _one(
                    client,
                    CompletionRequest(
                        model=model_id, prompt=prompts[i], max_tokens=requests[i].output_tokens, temperature=0.0
                    ),
                    start + requests[i].arrival - offset,
                    results,
                    i,
                    info,
                )
                for i in indexes
            )
        )
        return start

    # Round robin's real capacity, as the simulation defines it (all requests at once, the queue never empty): the
    # real run's arrival rate is a fraction of it.
    burst_n = 16 * REAL_NODES
    burst, burst_prompts = materialize(make_requests(workload, 1e9, burst_n, 1, seed + 1), salt=999)
    burst_results: list[tuple[float, float, int, int, int] | None] = [None] * burst_n
    async with client_for("round_robin") as client:
        await send(client, burst, burst_prompts, range(burst_n), burst_results)
    cap = burst_n / max(x[0] for x in burst_results if x is not None)
    info(f"real run: round robin capacity {cap:.2f} req/s")
    rate = cap * load
    arrivals = make_requests(workload, rate, count, 1, seed)
    # The policies take turns in blocks of the arrivals (the first policy of each block rotates), each with its own
    # client throughout: a burst of other work on the shared machine then hits every policy alike, not just the one
    # that happened to run at the time. Each block starts with the nodes idle; the simulation replays the same
    # blocks at the times they started for real.
    blocks = [list(range(b, min(count, b + REAL_BLOCK))) for b in range(0, count, REAL_BLOCK)]
    t0 = time.perf_counter()
    runs: list[tuple[str, list[Request], list[Any], float, dict[int, str]]] = []
    async with contextlib.AsyncExitStack() as stack:
        state = []
        for p_index, policy in enumerate(policies):
            requests, prompts = materialize(arrivals, salt=p_index)
            sent_to: dict[int, str] = {}
            client = await stack.enter_async_context(client_for(policy, sent_to))
            results: list[tuple[float, float, int, int, int] | None] = [None] * len(requests)
            state.append((policy, client, requests, prompts, results, sent_to, list(requests)))
        for b, block in enumerate(blocks):
            for k in range(len(state)):
                policy, client, requests, prompts, results, sent_to, replay = state[(b + k) % len(state)]
                started = await send(client, requests, prompts, block, results) - t0
                offset = requests[block[0]].arrival
                for i in block:
                    replay[i] = replace(requests[i], arrival=started + requests[i].arrival - offset)
    wall = time.perf_counter() - t0
    for policy, _client, _requests, _prompts, results, sent_to, replay in state:
        runs.append((policy, replay, results, wall, sent_to))
        info(f"real run: {policy}: {sum(x is not None for x in results)}/{len(replay)} answered")

    # The simulation at the same scale: the engine costs measured alone, scaled by ONE factor fitted so that its
    # round robin's median latency is the real one (the 3 engines share 2 cores with the relays, the client and the
    # rest of the machine; the median, since the real tail comes from that sharing); the other policies are then
    # predictions, compared with what the real ones measured.
    scenario = Scenario(workload, nodes=REAL_NODES, overhead_s=overhead)

    def scaled(factor: float) -> Calibration:
        return Calibration(
            cal.prefill_fixed_s * factor,
            cal.prefill_per_token_s * factor,
            cal.decode_fixed_s * factor,
            cal.decode_per_seq_s * factor,
            cal.source + f"; costs x{factor:.2f}, fitted to the real round robin's median latency (shared cores)",
        )

    rr = next((run_ for run_ in runs if run_[0] == "round_robin"), runs[0])
    rr_real = statistics.median(x[0] for x in rr[2] if x is not None)
    low, high = 0.25, 64.0
    for _ in range(24):  # the simulated median grows with the cost factor: bisect it
        mid = math.sqrt(low * high)
        if simulate(scenario, rr[0], rr[1], scaled(mid), seed)["p50_s"] < rr_real:
            low = mid
        else:
            high = mid
    scale = math.sqrt(low * high)
    cal = scaled(scale)
    info(f"real run: simulated engine costs x{scale:.2f} (fitted on {rr[0]})")
    rows: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for policy, requests, answers, wall, sent_to in runs:
        done = [x for x in answers if x is not None]
        for operator in sorted(set(sent_to.values())):
            names.setdefault(operator, f"model-{len(names) + 1}")
        per_node = {name: sum(1 for o in sent_to.values() if names[o] == name) for name in sorted(names.values())}
        slowest = sorted((i for i, x in enumerate(answers) if x is not None), key=lambda i: -answers[i][0])[:3]
        real = _stats([x[0] for x in done], [x[1] for x in done], sum(x[2] for x in done), sum(x[3] for x in done))
        simulated = simulate(scenario, policy, requests, cal, seed)
        rows.append(
            {
                "policy": policy,
                "requests": len(requests),
                "failed": len(requests) - len(done),
                "completion_tokens_mean": statistics.fmean(x[4] for x in done) if done else 0.0,
                "wall_s": wall,
                "requests_per_node": per_node,
                "slowest": [
                    {
                        "arrival_s": requests[i].arrival,
                        "latency_s": answers[i][0],
                        "ttft_s": answers[i][1],
                        "node": names.get(sent_to.get(i, ""), "?"),
                        "prompt_tokens": answers[i][3],
                        "cached_tokens": answers[i][2],
                    }
                    for i in slowest
                ],
                **{f"real_{k}": v for k, v in real.items()},
                **{f"sim_{k}": simulated[k] for k in ("mean_s", "p50_s", "p99_s", "ttft_mean_s", "cache_hit_rate")},
            }
        )
    base = next((r for r in rows if r["policy"] == "round_robin"), None)
    if base is not None:
        for row in rows:
            row["real_mean_vs_rr"] = row["real_mean_s"] / base["real_mean_s"]
            row["sim_mean_vs_rr"] = row["sim_mean_s"] / base["sim_mean_s"]
    return {
        "machine": f"{os.cpu_count()} cpus shared by {REAL_NODES} engines (1 thread each), {REAL_RELAYS} relays, "
        "the client, anvil and whatever else ran",
        "nodes": REAL_NODES,
        "relays": REAL_RELAYS,
        "paths": REAL_PATHS,
        "hops": REAL_HOPS,
        "load": load,
        "rate_rps": rate,
        "rr_capacity_rps": cap,
        "sim_cost_scale": scale,
        "network_overhead_s": overhead,
        "calibration": asdict(cal),
        "workload": asdict(workload),
        "rows": rows,
    }
