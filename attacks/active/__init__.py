"""Active attacks: a server that deviates from the protocol (issue 18, part 5).

Each module is one attack with the measurement of its success and, where one exists, the
client-side check (:mod:`gfmfr_secure.client.checks`) that defeats it:

1. :mod:`attacks.active.broadcast` -- a crafted broadcast model that makes the target's
   upload stand out of the secure sum (sent to the target alone: the broadcast-consistency
   check stops it; sent to everyone: undetectable, bounded by DP only).
2. :mod:`attacks.active.grouping` -- crafted oblivious-grouping centroids that put the
   target alone in a group (the group floor stops it), and reported group counts that keep
   that group unmerged (the count-transcript check stops it).
3. and 4. :mod:`attacks.active.unmasking` -- lying about dropouts during unmasking (split
   victim, with colluders; "all others dropped" with a different story for each holder)
   and shrinking the cohort to the target (the strict-majority threshold stops them).
5. :mod:`attacks.active.sybil` -- Sybil clients filling the target's group: secure
   aggregation cannot stop it; DP noise bounds it.

:mod:`attacks.active.harness` holds the client simulation and the target's score;
``python -m attacks.active`` prints every measured figure (``docs/active-attacks.md``).
"""
