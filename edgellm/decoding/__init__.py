"""The one decoding loop: step generators propose tokens, one emitter turns them into records.

`steps.py` has the step generators (plain, speculative with lookup or a draft model, token trees); each
yields `(token, from_draft)`. `emitter.py` owns text pieces, stop strings, finish reasons, stats and
timing. `stream.py` joins them for one sequence (`Engine.generate`); the scheduler feeds its batched
sequences through the same emitter.
"""
