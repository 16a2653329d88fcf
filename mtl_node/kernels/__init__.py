"""The kernel layer: the only copy of the maths of the aggregation rules and the attacks.

Every kernel works on a batch of neighbourhoods (numpy arrays of shape (rows, slots[, dim]) with a
``present`` mask; slot 0 is the agent itself). The daemon's round loop reaches them through the
rule and attack classes with one row; the vectorized engine (``mtl_node.batched``) calls them with
every row at once. So the two engines agree because they run the same code.

- ``ema``: loss / loss-filtered / distance (running scores, filter, inverse-score weights)
- ``robust``: median, trimmed mean, Krum, geometric median, self-clipping
- ``hardened``: the weight cap and the adaptive pull clipping of the hardened loss-filtered rules
- ``attacks``: what a Byzantine sender serves, from its honest model, its pool or its victim's
- ``decisions``: decision codes and the reason texts of the decision log

Pure numpy: no torch, no grpc (import-linter checks it).
"""
