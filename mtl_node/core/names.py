"""Every built-in task, rule and attack: its name and one-line description, without torch.

The one place these are written. The orchestrator validates topologies against them (it must plan
and render deployments without torch); the registries that hold the implementations
(``mtl_node.tasks.TASKS``, ``mtl_node.aggregation.RULES``, ``mtl_node.attack_api.ATTACKS``) take
each built-in's description from here and refuse a built-in name missing here, and
tests/unit/test_catalog.py checks both sides hold the same names.
"""

from __future__ import annotations

TASKS: dict[str, str] = {
    "digits": "digit classification with the paper's CNN; MNIST-like or synthetic (paper 7.2)",
    "har": "human activity recognition: linear softmax on 561 features, 6 classes (paper 7.2)",
    "target-localization": "streaming LMS regression of a target location (paper 7.1)",
}

RULES: dict[str, str] = {
    "average": "equal weights over every neighbour whose model arrived",
    "balance": "accept neighbours within gamma*exp(-kappa*i/T)*||own||; alpha*own + rest's mean",
    "clipped-gossip": "own + mean of pulls clipped to the adaptive CS+ radius (needs 2f+2)",
    "distance": "eq. 4: inverse EMA of ||theta_prev - psi_l||^2, no filter",
    "geometric-median": "Weiszfeld geometric median of the neighbourhood (needs 2f+1)",
    "ios": "iterative outlier scissor: drop the f farthest from the mean one by one (needs 2f+1)",
    "krum": "the member closest to its n-f-2 nearest others (needs 2f+3 members)",
    "loss": "eq. 9: inverse EMA loss on own data, no filter",
    "loss-filtered": "eq. 10: inverse EMA loss on own data, neighbours worse than self dropped",
    "loss-filtered-capped": "loss-filtered, no neighbour weighing more than weight_cap x self",
    "loss-filtered-clipped": "loss-filtered, kept neighbours' pulls clipped to clip_scale x the "
    "agent's own step",
    "loss-filtered-median": "loss-filtered's kept neighbours and the agent: their coordinate-wise median",
    "median": "coordinate-wise median of the neighbourhood (needs 2f+1 members)",
    "none": "non-cooperative: every agent keeps its own model",
    "self-clipping": "own model + mean of neighbours' pulls clipped to clip_tau (no assumption)",
    "trimmed-mean": "coordinate-wise mean less the f largest and f smallest (needs 2f+1)",
    "ubar": "closest ceil(rho*m) neighbours, then those with loss <= own; alpha*own + their mean",
}

ATTACKS: dict[str, str] = {
    "adaptive": "white-box: per victim psi_k + lambda d, lambda as large as the victim's rule "
    "accepts (loss test, clipping or acceptance radius)",
    "alie": "a little is enough: mean +- z * std of the honest models, per coordinate",
    "backdoor": "a model trained on its data plus triggered samples relabelled to the target "
    "class (classification torch tasks; attack_success measures it)",
    "constant": "per-coordinate values drawn from [low, high] (paper: [15,16])",
    "dissensus": "per victim psi_k - eps * sum of its honest neighbours' pulls / B: undoes gossip",
    "distance-capture": "per victim w_k + r (g - w_k): close to the victim, so distance weights pick it",
    "echo": "returns the requester its own model (accepted by the loss filter, adds nothing)",
    "gaussian": "a random model: every coordinate ~ N(mean, std^2) (default std 200)",
    "ipm": "inner-product manipulation: -epsilon * mean of the honest models it knows",
    "label-flip": "a model trained alone on flipped labels (classification tasks)",
    "loss-budget": "largest step from the victim's model towards a goal keeping the proxy loss "
    "within the victim's",
    "low-loss": "the honest model over-fitted to the round's data: tiny loss, so 1/loss wins",
    "mimic": "copies an honest neighbour's model (over-weighs one agent's data)",
    "min-max": "mu - gamma*p (std, unit or sign), gamma as large as keeps it within the honest "
    "models' largest pairwise distance",
    "min-sum": "mu - gamma*p, gamma as large as keeps its summed squared distance to the honest "
    "models within theirs",
    "nan": "NaN or Inf payloads: a fraction of coordinates set to nan, inf or -inf",
    "omission": "never sends a model: refuses at once, or hangs until the requester's deadline",
    "on-off": "honest for honest_rounds rounds, then another attack (optionally in cycles)",
    "rop": "relocated orthogonal perturbation: near the honest mean, pushed orthogonally to the "
    "victim's heading (against clipping)",
    "scaled": "honest parameters times U[low, high] per coordinate (paper: U[0,0.1])",
    "sign-flip": "the honest model with its sign flipped: -scale * h",
    "small-perturbation": "the honest model plus tiny Gaussian noise N(0, std^2)",
    "stale": "replays its own honest model of an old round, max(1, i - lag)",
}

TASK_NAMES = tuple(sorted(TASKS))
RULE_NAMES = tuple(sorted(RULES))
ATTACK_NAMES = tuple(sorted(ATTACKS))


def attack_label(attack: str | None, params: dict[str, object] | None = None) -> str:
    """How results and reports name an attack (its name, or the label a sweep gives it), with
    "(omniscient)" added when it reads its victims' data (adaptive's ``omniscient: true``, in-process
    engine only), so that no table passes it off as an attack a real node could mount."""
    if attack is None:
        return "-"
    omniscient = (params or {}).get("omniscient") is True and "(omniscient)" not in attack
    return f"{attack} (omniscient)" if omniscient else attack
