"""A tiny verifiers 0.4 taskset for tests (taskset id ``tests.verifiers_echo``).

Each task asks to repeat a word; the reward is the length of the reply in
characters, so a test can check the exact text the model generated.
"""

import verifiers.v1 as vf

WORDS = ["apple", "river", "stone", "cloud"]


class EchoData(vf.TaskData):
    word: str = ""


class EchoTask(vf.Task[EchoData]):
    @vf.reward(weight=1.0)
    async def reply_length(self, trace: vf.Trace) -> float:
        return float(len(trace.last_reply))


class EchoConfig(vf.TasksetConfig):
    pass


class EchoTaskset(vf.Taskset[EchoTask, EchoConfig]):
    def load(self) -> list[EchoTask]:
        return [EchoTask(EchoData(prompt=f"Repeat the word {w}.", word=w), self.config.task) for w in WORDS]


__all__ = ["EchoTaskset"]
