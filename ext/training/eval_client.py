"""verifiers environments as evaluation targets (``[eval] verifiers_envs``).

Needs the optional extra: ``pip install -e .[verifiers]`` (verifiers 0.4.x,
which brings openai, mcp, anthropic and more; not part of the default
install). Written against verifiers 0.4.0 as installed; what was run and what
was not is in docs/eval.md.

How the model answers. verifiers 0.4 environments reach a model through
their interception server, which relays each chat-completions request to an
OpenAI-compatible endpoint (``EvalClientConfig.base_url``). So evaluation
starts :class:`ChatCompletionsServer`, a minimal OpenAI-compatible endpoint on
127.0.0.1 (``POST /v1/chat/completions``, also as a one-chunk SSE stream;
``GET /v1/models``; a random bearer key per run), whose requests are answered
by :class:`ChatGenerator` from the current weights of the model being trained:
the tokenizer's chat template with the generation prompt, batched greedy
(temperature 0) or sampled (temperature, top_p) decoding, stopping at an
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, EOS, the tokens of
``generation_config.json``), at ``max_tokens`` or at ``[training] seq_len``.
Decoding recomputes the whole sequence at each token (torchtitan's models
keep no KV cache): fine for the short answers of eval tasks, slow for long
ones.

Where it runs. The environments run on rank 0 (an asyncio loop in a helper
thread); the main thread of every rank generates in lockstep: rank 0
broadcasts each batch of pending requests and each step's chosen tokens over
a gloo group, so FSDP/TP collectives line up and every rank holds the same
answers. Pipeline parallelism is not supported.

Which harness. A taskset's default harness in verifiers 0.4 (``bash``,
``null``) runs a chat program through ``uv`` in a subprocess, which needs to
download its dependencies. Ours, :class:`ChatHarness` (harness id
``ext_chat_harness``: verifiers resolves plugin ids as top-level modules, so
importing this module registers it under that name), runs a plain chat exchange in-process through the
interception endpoint (verifiers' documented alternative: "a harness may run
its loop in-process ... as long as every model call goes through endpoint +
secret"), with the subprocess runtime. It handles single-turn tasks (the
prompt, or the prompt's messages, then one reply); tool use and multi-turn
user simulation need the taskset's own harness, which ``[eval]
verifiers_harness = ""`` selects.

Reward: the mean over the evaluated tasks of each episode's reward (the sum
of its trace's weighted rewards); episodes that failed count as 0 and are
reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.tools.logging import logger

from ext.data.encoders import load_chat_tokenizer
from ext.core.device import run_device
from ext.core.parallel import host_group

HARNESS_ID = "ext_chat_harness"  # verifiers plugin ids are top-level module names: aliased below
_KEY_ENV = "EXT_EVAL_ENDPOINT_KEY"
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|eom_id|>")
_LENGTH_MULTIPLE = 64  # pad decode inputs to few distinct shapes
_TIMEOUT_S = 3600.0  # an evaluation still running after this is abandoned (NaN rewards), training goes on


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end-of-turn token) or "length"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


class ChatGenerator:
    """Chat completions from a torchtitan model, batched, in lockstep over ranks.

    ``model_parts[0]`` is called as the trainer does (``input`` plus
    ``segment_ids``/``positions`` when the model takes them; right-padded rows,
    causal attention, so padding never reaches a real token's logits).
    """

    def __init__(self, hf_assets_path: str, template_file: str, model_keys: tuple[str, ...],
                 seq_len: int, prepare: Any, group: Any = None):
        self.tok = load_chat_tokenizer(hf_assets_path, template_file)
        self.model_keys = model_keys
        self.seq_len = seq_len
        self.prepare = prepare  # (input_dict, labels, model_parts) -> (inputs, labels, extra_inputs, extra_kwargs)
        self.group = group
        self.end_ids = self._end_of_turn_ids(hf_assets_path)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.end_ids)

    def _end_of_turn_ids(self, hf_assets_path: str) -> set[int]:
        ids = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        vocab = self.tok.get_vocab()
        ids |= {vocab[t] for t in _END_OF_TURN if t in vocab}
        path = os.path.join(hf_assets_path, "generation_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids: the chat template with the generation prompt (the template emits BOS)."""
        msgs = [{"role": m.get("role", "user"), "content": _text(m.get("content"))} for m in messages]
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _sync(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.broadcast(tokens, src=0, group=self.group)
        return tokens

    @torch.no_grad()
    def generate(self, model_parts: list[torch.nn.Module], requests: list[GenerationRequest],
                 generator: torch.Generator | None = None) -> list[Completion]:
        """Decode every request to its end; call on every rank with the same requests."""
        device = run_device()
        seqs = [list(r.prompt_ids[: self.seq_len]) for r in requests]
        outputs: list[list[int]] = [[] for _ in requests]
        finish = ["length"] * len(requests)
        active = [i for i, r in enumerate(requests) if r.max_tokens > 0 and len(seqs[i]) < self.seq_len]
        while active:
            lengths = torch.tensor([len(seqs[i]) for i in active])
            width = min(self.seq_len, -(-int(lengths.max()) // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE)
            ids = torch.full((len(active), width), self.pad_id, dtype=torch.int64)
            for row, i in enumerate(active):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            batch = {"input": ids, "segment_ids": torch.zeros_like(ids),
                     "positions": torch.arange(width).expand_as(ids).clone()}
            batch = {k: v.to(device) for k, v in batch.items() if k in self.model_keys}
            inputs, _, extra_inputs, extra_kwargs = self.prepare(batch, batch["input"], model_parts)
            logits = model_parts[0](inputs, **extra_inputs, **extra_kwargs)
            last = logits[torch.arange(len(active), device=device), lengths.to(device) - 1].float()
            chosen = torch.empty(len(active), dtype=torch.int64)
            for row, i in enumerate(active):
                chosen[row] = _pick(last[row], requests[i].temperature, requests[i].top_p, generator)
            chosen = self._sync(chosen)  # rank 0's choice everywhere
            still = []
            for row, i in enumerate(active):
                token = int(chosen[row])
                if token in self.end_ids:
                    finish[i] = "stop"
                    continue
                seqs[i].append(token)
                outputs[i].append(token)
                if len(outputs[i]) < requests[i].max_tokens and len(seqs[i]) < self.seq_len:
                    still.append(i)
            active = still
        return [Completion(out, self.tok.decode(out, skip_special_tokens=True), fr)
                for out, fr in zip(outputs, finish)]


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class ChatCompletionsServer:
    """A minimal OpenAI-compatible chat-completions endpoint on 127.0.0.1.

    Requests are parsed in the server's threads and queued; :meth:`take` hands
    them to the generating thread, which answers each with :meth:`answer`.
    """

    def __init__(self, generator: ChatGenerator, model_name: str, default_max_tokens: int,
                 default_temperature: float):
        self.generator = generator
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.default_temperature = default_temperature
        self.key = secrets.token_hex(16)
        self.pending: queue.Queue[tuple[GenerationRequest, Future]] = queue.Queue()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the training log clean
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._reply(200, {"object": "list", "data": [
                        {"id": server.model_name, "object": "model", "owned_by": "ext"}]})
                else:
                    self._reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                if self.headers.get("Authorization", "") != f"Bearer {server.key}":
                    self._reply(401, {"error": {"message": "bad API key"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._reply(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    request = server.parse(body)
                except (ValueError, KeyError, TypeError) as exc:
                    self._reply(400, {"error": {"message": f"bad request: {exc}"}})
                    return
                future: Future = Future()
                server.pending.put((request, future))
                completion = future.result()
                if isinstance(completion, BaseException):
                    self._reply(500, {"error": {"message": str(completion)}})
                elif body.get("stream"):
                    self._stream(server.response(body, request, completion))
                else:
                    self._reply(200, server.response(body, request, completion))

            def _stream(self, full: dict) -> None:
                choice = full["choices"][0]
                base = {k: full[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
                chunks = [
                    {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                "content": choice["message"]["content"]},
                                          "finish_reason": None}]},
                    {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
                     "usage": full["usage"]},
                ]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, name="ext-eval-endpoint", daemon=True).start()

    def parse(self, body: dict) -> GenerationRequest:
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        temperature = body.get("temperature")
        return GenerationRequest(
            prompt_ids=self.generator.encode_chat(body["messages"]),
            max_tokens=min(int(max_tokens), self.default_max_tokens),
            temperature=float(self.default_temperature if temperature is None else temperature),
            top_p=float(body.get("top_p") or 1.0),
        )

    def response(self, body: dict, request: GenerationRequest, completion: Completion) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(completion.token_ids),
                      "total_tokens": len(request.prompt_ids) + len(completion.token_ids)},
        }

    def take(self, timeout: float, limit: int = 64) -> list[tuple[GenerationRequest, Future]]:
        """The requests waiting now (after at most ``timeout`` seconds for the first)."""
        try:
            batch = [self.pending.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < limit:
            try:
                batch.append(self.pending.get_nowait())
            except queue.Empty:
                break
        return batch

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class VerifiersEval:
    """Loads the ``[eval] verifiers_envs`` once and runs them at evaluation steps."""

    def __init__(self, job_config: Any, tokenizer: Any, parallel_dims: Any, model_keys: tuple[str, ...],
                 validator: Any):
        from ext.core.errors import ConfigError

        try:
            import verifiers.v1 as vf
        except ImportError as exc:
            raise ConfigError(f"[eval] verifiers_envs needs the verifiers package ({exc}); install it with "
                              "`pip install -e .[verifiers]` or set [eval] verifiers_envs = []") from None
        if parallel_dims is not None and parallel_dims.pp_enabled:
            raise ConfigError("[eval] verifiers_envs cannot generate with pipeline parallelism; "
                              "set [eval] verifiers_envs = []")
        self.cfg = job_config.eval
        self.seed = job_config.debug.seed if job_config.debug.seed is not None else 0
        self.group = host_group()
        self.rank0 = self.group is None or dist.get_rank() == 0
        sft = getattr(job_config, "sft", None)
        self.generator = ChatGenerator(job_config.model.hf_assets_path, sft.template_file if sft else "",
                                       model_keys, job_config.training.seq_len, validator.prepare, self.group)
        self.server = None
        self.envs: dict[str, Any] = {}
        if not self.rank0:
            return
        self.server = ChatCompletionsServer(self.generator, "ext-eval", self.cfg.verifiers_max_tokens,
                                            self.cfg.verifiers_temperature)
        os.environ[_KEY_ENV] = self.server.key
        harness = getattr(self.cfg, "verifiers_harness", HARNESS_ID)
        for env_id in self.cfg.verifiers_envs:
            agent: dict[str, Any] = {"runtime": {"type": "subprocess"}}
            if harness:
                agent["harness"] = {"id": harness}
            config = vf.resolve_env_config({"taskset": {"id": env_id}, "agent": agent})
            try:  # a bad id fails here, at start-up
                self.envs[env_id] = vf.load_environment(config)
            except (ImportError, AttributeError, TypeError, ValueError) as exc:
                raise ConfigError(f"[eval] verifiers_envs: {env_id!r} cannot be loaded: "
                                  f"{' '.join(str(exc).split())}") from None
        self.vf = vf

    async def _evaluate(self) -> dict[str, tuple[float, int, int]]:
        vf = self.vf
        ctx = vf.ModelContext(
            model="ext-eval",
            client=vf.EvalClientConfig(base_url=self.server.url, api_key_var=_KEY_ENV),
            sampling=vf.Sampling(temperature=self.cfg.verifiers_temperature,
                                 max_tokens=self.cfg.verifiers_max_tokens),
        )
        results = {}
        for env_id, env in self.envs.items():
            tasks = list(env.taskset.take(self.cfg.verifiers_num_examples))
            async with env.serving():
                episodes = await asyncio.gather(
                    *(env.run_slot(slot, ctx) for task in tasks for slot in env.slots(task, 1))
                )
            rewards = [_episode_reward(e) for e in episodes]
            failed = sum(r is None for r in rewards)
            results[env_id] = (sum(r or 0.0 for r in rewards) / max(len(rewards), 1), len(rewards), failed)
        return results

    def run(self, model_parts: list[torch.nn.Module], step: int) -> dict[str, float]:
        """Mean reward per environment (the same dict on every rank)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if not self.rank0:
            while True:
                batch = [None]
                dist.broadcast_object_list(batch, src=0, group=self.group)
                if batch[0] is None:
                    break
                self.generator.generate(model_parts, batch[0], generator)
            out = [None]
            dist.broadcast_object_list(out, src=0, group=self.group)
            return out[0]
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def drive() -> None:
            try:
                outcome["results"] = asyncio.run(self._evaluate())
            except BaseException as exc:  # reported below, on the main thread
                outcome["error"] = exc
            finally:
                done.set()

        thread = threading.Thread(target=drive, name="ext-eval-verifiers", daemon=True)
        thread.start()
        deadline = time.monotonic() + _TIMEOUT_S
        while not done.is_set() or not self.server.pending.empty():
            if time.monotonic() > deadline:
                outcome["error"] = TimeoutError(f"still running after {_TIMEOUT_S:.0f} s; abandoned")
                break
            batch = self.server.take(timeout=0.05)
            if not batch:
                continue
            requests = [r for r, _ in batch]
            if self.group is not None:
                dist.broadcast_object_list([requests], src=0, group=self.group)
            try:
                completions = self.generator.generate(model_parts, requests, generator)
            except BaseException as exc:
                for _, future in batch:
                    future.set_result(exc)
                raise
            for (_, future), completion in zip(batch, completions):
                future.set_result(completion)
        if "error" not in outcome:
            thread.join()
        rewards: dict[str, float] = {}
        if "error" in outcome:
            logger.warning(f"[eval] verifiers evaluation failed: {type(outcome['error']).__name__}: "
                           f"{outcome['error']}")
            rewards = {env_id: float("nan") for env_id in self.envs}
        else:
            for env_id, (mean, n, failed) in outcome["results"].items():
                rewards[env_id] = mean
                if failed:
                    logger.warning(f"[eval] verifiers env {env_id!r}: {failed} of {n} episodes failed (reward 0)")
        if self.group is not None:
            dist.broadcast_object_list([None], src=0, group=self.group)
            dist.broadcast_object_list([rewards], src=0, group=self.group)
        return rewards


def _episode_reward(episode: Any) -> float | None:
    if not getattr(episode, "ok", False) or not episode.traces:
        return None
    return float(sum(trace.reward for trace in episode.traces))


# -- the in-process harness (verifiers plugin id "ext.training.eval_client") ---------------------------

try:
    from verifiers.v1 import Harness as _Harness, HarnessConfig as _HarnessConfig, ProgramResult as _ProgramResult
except ImportError:  # the optional extra is not installed: nothing below is needed
    __all__ = ["ChatCompletionsServer", "ChatGenerator", "VerifiersEval"]
else:

    class ChatHarnessConfig(_HarnessConfig):
        """No settings: the model, endpoint and sampling come from the run."""

    class ChatHarness(_Harness[ChatHarnessConfig]):
        """One chat exchange, in-process, through the rollout's interception endpoint."""

        APPENDS_SYSTEM_PROMPT = True
        SUPPORTS_RESUME = True
        EXECUTES_CODE = False
        NEEDS_CONTAINER = False

        async def launch(self, ctx, trace, runtime, endpoint, secret, mcp_urls, data, **_: Any):
            import httpx

            system, prompt = self.resolve_prompt(data)
            messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
            if isinstance(prompt, str):
                messages.append({"role": "user", "content": prompt})
            else:
                messages += [m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m)
                             for m in prompt or []]
            body: dict[str, Any] = {"model": ctx.model, "messages": messages}
            body.update(ctx.sampling.model_dump(exclude_none=True))
            async with httpx.AsyncClient(timeout=None) as client:
                reply = await client.post(f"{endpoint.rstrip('/')}/chat/completions", json=body,
                                          headers={"Authorization": f"Bearer {secret}"})
            if reply.status_code != 200:
                return _ProgramResult(exit_code=1, stdout="", stderr=reply.text[-2000:])
            content = reply.json()["choices"][0]["message"].get("content") or ""
            return _ProgramResult(exit_code=0, stdout=content, stderr="")

    __all__ = ["ChatHarness", "ChatHarnessConfig", "ChatCompletionsServer", "ChatGenerator", "VerifiersEval"]
    sys.modules.setdefault(HARNESS_ID, sys.modules[__name__])
