"""A vectorized in-process engine for target localization: the fast path for sweeps.

The per-agent engine (``mtl_node.engine.run_agents``) runs every agent's round loop as its own
asyncio task and hands torch tensors around; that is what makes it a faithful oracle of the daemons,
and also why a 100-agent, 500-round sweep spends nearly all its time in interpreter overhead. Here
all N agents' models are one ``(N, 2)`` float64 array and a round is a few numpy operations over
``(N, D)`` *slot* arrays: slot 0 of row k is agent k itself, slots 1.. its neighbours in aggregation
order, padded to the largest neighbourhood D. In slot form

- ``models[k, s]`` is the model agent k received from its s-th neighbour this round (a Byzantine
  sender's crafted model replaces its honest one, per receiver where the attack says so),
- ``scores[k, s]`` is the loss of that model on agent k's own sample (or its squared distance to
  theta_k(i-1) for the distance rule): the paper's loss matrix L[k, l] restricted to edges,
- the EMA matrix, filter and inverse-EMA weights are row-wise masks and sums, and the combination
  theta_k = sum_l a_lk psi_l is one batched matrix product.

It runs the same kernels as the agents (``mtl_node.kernels``: the EMA rules, the hardened and robust
rules, the decentralized defenses, every attack's formula, the decision reasons), with every row at
once where the agents call them with one row, and draws its data from
``mtl_node.tasks.target_localization`` and its attack draws from
``mtl_node.attack_api.draw_generator`` with the same seeds. What is left here is plumbing: gathering
each row's inputs and storing the outputs. ``tests/unit/test_batched.py`` and
``tests/unit/test_batched_decentralized.py`` keep cross-checking it against the per-agent engine
(per-round metrics, decisions and final models agree to 1e-9: the adaptation and scoring are
float64 numpy here and float64 torch there). Anything it does not cover (other tasks, a few attack
settings, cuda) is refused by :func:`supports`; callers fall back to the per-agent engine.

Layout: ``network`` (the slot form and what can be batched), ``attack_kinds`` (which attacks and
networks of attackers it reproduces), ``senders`` (Byzantine senders),
``engine`` (the round and the run loop), ``decentralized`` (ubar, balance, clipped-gossip and ios
rows), ``result`` (arrays, rows and records); the maths of every
rule and attack is in ``mtl_node.kernels``. ``torch_engine`` is the same idea for torch tasks (HAR,
digits, custom ``module:factory`` tasks, SGD or Adam: stacked parameters, local steps and scoring
vmapped or one call per model; ``torch_model``, ``torch_optim``, ``torch_support``, ``torch_pool``,
``torch_rules``, ``torch_draws``, ``torch_trigger``; see its docstring for what it runs and what
falls back).
"""

from mtl_node.batched.attack_kinds import ATTACKS, POOL_ATTACKS, REQUESTER_ATTACKS, attack_unsupported
from mtl_node.batched.engine import run_batched, run_many
from mtl_node.batched.network import RULES, TASK, supports, unsupported_reason
from mtl_node.batched.result import BatchedResult, Decisions

__all__ = [
    "ATTACKS",
    "POOL_ATTACKS",
    "REQUESTER_ATTACKS",
    "RULES",
    "TASK",
    "BatchedResult",
    "Decisions",
    "attack_unsupported",
    "run_batched",
    "run_many",
    "supports",
    "unsupported_reason",
]
