"""What the bot itself costs per turn, measured against an instant model.

`python -m benchmarks` runs everything and writes BENCHMARKS.md; `--quick` is a tiny run
(the test uses it). The model is replaced by `InstantModel`, an in-process `ModelClient`
that answers at once, so a turn's time is the bot's own work: session load and lock
(`begin_turn`), context assembly (`build_context`), saving the turn (`finish_turn`) and the
engine around them. Two figures keep the real SDK and the fake Discord gateway in the loop;
they import the fakes from `tests/` (run from the repository root).
"""
