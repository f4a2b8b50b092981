"""The tiny-shapes prompt sets, registered with :mod:`diffusion_mdp.prompts`.

- ``shapes_train``: every caption the bundled model was trained on (15 colour–shape pairs × counts 1–4).
- ``shapes_heldout``: the colour–shape pairs never seen in training (3 pairs × counts 1–4), to measure
  generalisation to unseen compositions.
- ``shapes_counting``: the training pairs with counts 2–4 only, where counting is the hard part.
- ``shapes_four`` / ``shapes_four_heldout``: "four …" on the training pairs (15 prompts) and on the unseen
  pairs (3 prompts), the task with headroom: the bundled model often draws three or five shapes, or a
  merged or two-coloured one, which the ``shapes_geneval`` judge catches (the captioner's count head stops
  at four, so it reads five shapes as four).
- ``shapes_four_rl_train`` / ``shapes_four_rl_heldout``: ``shapes_four`` split for RL (12 / 3 prompts): the
  3 held-out pairs are ones the base model was trained on, kept out of RL fine-tuning, so a gain on them is
  a gain on prompts RL never saw (the paper's generalisation test; ``shapes_four_heldout`` is the harder
  one: pairs neither the base model nor RL saw).

Each prompt's metadata is ``{"count": int, "colour": str, "shape": str}``, read by the alignment rewards.

>>> from diffusion_mdp.prompts import load_prompts
>>> s = load_prompts("shapes_heldout")
>>> len(s), s.prompts[0], s.metadata[0]
(12, 'a blue triangle', {'count': 1, 'colour': 'blue', 'shape': 'triangle'})
>>> len(load_prompts("shapes_train")), len(load_prompts("shapes_counting"))
(60, 45)
>>> load_prompts("shapes_four_heldout").prompts
['four blue triangles', 'four yellow circles', 'four purple squares']
>>> load_prompts("shapes_four_rl_heldout").prompts
['four red squares', 'four green triangles', 'four orange circles']
>>> len(load_prompts("shapes_four_rl_train"))
12
"""

from __future__ import annotations

from diffusion_mdp.prompts import PromptSet, register_prompt_set
from diffusion_mdp.shapes.dataset import ALL_COMBOS, HELDOUT_COMBOS, TRAIN_COMBOS, ShapeSpec, all_specs

# Training pairs kept out of RL: one per shape, each in a colour none of the unseen pairs uses.
RL_HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("red", "square"), ("green", "triangle"), ("orange", "circle")}
)


def _prompt_set(specs: list[ShapeSpec], name: str) -> PromptSet:
    return PromptSet([s.caption for s in specs], [s.as_dict() for s in specs], name=name)


@register_prompt_set("shapes_train")
def shapes_train() -> PromptSet:
    """Captions of the training distribution (60 prompts)."""
    return _prompt_set(all_specs(TRAIN_COMBOS), "shapes_train")


@register_prompt_set("shapes_heldout")
def shapes_heldout() -> PromptSet:
    """Unseen colour–shape pairs (12 prompts)."""
    heldout = tuple(cs for cs in ALL_COMBOS if cs in HELDOUT_COMBOS)
    return _prompt_set(all_specs(heldout), "shapes_heldout")


@register_prompt_set("shapes_counting")
def shapes_counting() -> PromptSet:
    """Training pairs with 2–4 shapes (45 prompts)."""
    return _prompt_set([s for s in all_specs(TRAIN_COMBOS) if s.count > 1], "shapes_counting")


@register_prompt_set("shapes_four")
def shapes_four() -> PromptSet:
    """Four shapes of each training pair (15 prompts)."""
    return _prompt_set([s for s in all_specs(TRAIN_COMBOS) if s.count == 4], "shapes_four")


@register_prompt_set("shapes_four_heldout")
def shapes_four_heldout() -> PromptSet:
    """Four shapes of each unseen pair (3 prompts)."""
    heldout = tuple(cs for cs in ALL_COMBOS if cs in HELDOUT_COMBOS)
    return _prompt_set([s for s in all_specs(heldout) if s.count == 4], "shapes_four_heldout")


@register_prompt_set("shapes_four_rl_train")
def shapes_four_rl_train() -> PromptSet:
    """``shapes_four`` without the 3 pairs RL holds out (12 prompts)."""
    return _prompt_set(
        [s for s in all_specs(TRAIN_COMBOS) if s.count == 4 and (s.colour, s.shape) not in RL_HELDOUT_COMBOS],
        "shapes_four_rl_train",
    )


@register_prompt_set("shapes_four_rl_heldout")
def shapes_four_rl_heldout() -> PromptSet:
    """The 3 training pairs RL holds out, four of each (3 prompts; the base model saw them)."""
    return _prompt_set(
        [s for s in all_specs(TRAIN_COMBOS) if s.count == 4 and (s.colour, s.shape) in RL_HELDOUT_COMBOS],
        "shapes_four_rl_heldout",
    )
