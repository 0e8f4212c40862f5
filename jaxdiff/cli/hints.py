"""What the library's errors advise, in the command line's terms.

The library names its own arguments and concepts ("lower the learning rate", "a fresh work
directory"); `flag_words` swaps those phrases for the flag that does it, and `memory_hints`
names the config flags that reduce memory with their current values, for
`jaxdiff.train.oom.oom_message`."""

from __future__ import annotations

from jaxdiff.train import checkpoint, nonfinite, rundir

# library phrase -> the same advice as a flag (jaxdiff.train.nonfinite, .checkpoint, .rundir)
FLAG_WORDS = {
    nonfinite.LOWER_LR: "lower --config.optim.lr",
    nonfinite.SKIP: "set --config.train.skip_nonfinite=True",
    checkpoint.FRESH_WORKDIR: "a fresh --workdir",
    rundir.OTHER_WORKDIR: "another --workdir",
}
MEMORY_KNOBS = {  # config key -> how to use it to save memory
    "data.batch_size": "a smaller --config.data.batch_size",
    "model.remat": "--config.model.remat=True (recompute activations in the backward pass)",
    "mesh.fsdp": "--config.mesh.fsdp=N (shard params and optimizer state over N devices)",
}


def flag_words(message):
    """`message` with each library phrase of FLAG_WORDS replaced by its flag."""
    for phrase, flag in FLAG_WORDS.items():
        message = message.replace(phrase, flag)
    return message


def memory_hints(config):
    """The MEMORY_KNOBS this config has, each with its current value ("... [now 64]"); all of
    them, without values, when it has none. `model.remat` exists for some models only and the
    `mesh` keys are optional, hence the look-ups that tolerate a missing key."""
    hints = []
    for key, text in MEMORY_KNOBS.items():
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is not None:
            hints.append(f"{text} [now {node}]")
    return hints or list(MEMORY_KNOBS.values())
