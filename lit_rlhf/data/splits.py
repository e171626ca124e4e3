"""Seeded splits by group (post, message tree): no group ever lands in two splits."""

import random
from collections.abc import Iterable


def assign_splits(groups: Iterable, fractions: dict[str, float], seed: int = 0) -> dict:
    """Map each distinct group to a split name.

    `fractions` gives the share of *groups* per split (e.g. {"train": .8, "validation": .1,
    "test": .1}); groups are shuffled with `seed`, so the same data and seed give the same split.
    Every split with a positive fraction gets at least one group when there are enough groups.
    """
    unique = sorted(set(groups), key=str)
    random.Random(seed).shuffle(unique)
    total = sum(fractions.values())
    names = [name for name, share in fractions.items() if share > 0]
    counts = {name: int(round(fractions[name] / total * len(unique))) for name in names[1:]}
    for name in names[1:]:
        if counts[name] == 0 and len(unique) > len(names):
            counts[name] = 1
    assignment, start = {}, 0
    for name in names[1:]:
        for group in unique[start : start + counts[name]]:
            assignment[group] = name
        start += counts[name]
    for group in unique[start:]:
        assignment[group] = names[0]
    return assignment
