"""`n` > 1: several choices of one request, whose prompt the engine computes once.

The first choice is submitted alone and read until its first chunk: by then the engine has computed its prompt
and left the prompt's full KV blocks in the team's prefix cache, so the other n - 1 choices, submitted with the
same cache scope, take those blocks instead of computing them again (only the part of the prompt that does not
fill a block is computed per choice). Without a prefix cache, or with a prompt shorter than one block, each
choice computes its prompt itself; the answer is the same, only slower.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from inference.engine.request import SamplingParams

MAX_CHOICES = 8
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (the request schema's bound)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Return choice `index`'s sampling parameters: with a seed, choice i samples with seed + i."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % SEED_LIMIT)


class FirstChunkRead:
    """A handle whose first chunk was read before anyone iterated it; iterating yields that chunk, then the rest."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self._chunks = aiter(handle)
        self._first = None

    async def read_first(self):
        self._first = await anext(self._chunks)
        return self._first

    def cancel(self) -> None:
        self.handle.cancel()

    async def __aiter__(self) -> AsyncIterator:
        try:
            yield self._first
            if self._first.finish_reason is None:
                async for chunk in self._chunks:
                    yield chunk
        finally:
            await self._chunks.aclose()  # an early exit cancels the request, as leaving the handle's loop does


async def submit_choices(engine, prompt_ids: list[int], params: SamplingParams, n: int, scope: str) -> list:
    """Submit one prompt's n choices, the first alone until its prompt is computed; return their handles.

    Raises what the engine refused a submission with (EngineBusy, PromptTooLong, EngineClosed), after
    cancelling the choices it had taken.
    """
    return await submit_prompts_choices(engine, [prompt_ids], params, n, scope)


async def submit_prompts_choices(engine, prompts: list[list[int]], params: SamplingParams, n: int,
                                 scope: str) -> list:
    """Submit n choices of each prompt; return their handles, prompt by prompt (choice i of prompt p at p * n + i).

    Every prompt's first choice is submitted at once (their prompts are computed in the same steps); the other
    choices once each first choice has sent its first chunk. On a refusal, every choice taken is cancelled.
    """
    firsts: list = []
    handles: list = []
    try:
        for prompt_ids in prompts:
            firsts.append(engine.submit(prompt_ids, params, cache_scope=scope))
            await firsts[-1].accepted()  # an engine process answers whether it took the request
        if n == 1:
            return firsts
        firsts = [FirstChunkRead(first) for first in firsts]
        await asyncio.gather(*(first.read_first() for first in firsts))
        for prompt_ids, first in zip(prompts, firsts):
            handles.append(first)
            for index in range(1, n):
                handles.append(engine.submit(prompt_ids, choice_params(params, index), cache_scope=scope))
                await handles[-1].accepted()
    except BaseException:
        for handle in {id(h): h for h in firsts + handles}.values():
            handle.cancel()
        raise
    return handles


async def merged(streams: list) -> AsyncIterator:
    """Yield the items of several async iterators as each has one, each iterator's items in their order."""
    waiting = {asyncio.ensure_future(anext(stream)): stream for stream in streams}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                stream = waiting.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                waiting[asyncio.ensure_future(anext(stream))] = stream
                yield item
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
