"""The network a trial fine-tunes: which one, with which weights, and what it costs.

| module      | its one job                                                                       |
|-------------|-----------------------------------------------------------------------------------|
| `build`     | a torchvision classifier ready to fine-tune: weights, head, freezing, groups       |
| `families`  | where each family's head and stages are; the `model.factory` protocol             |
| `weights`   | what a `model.weights:` value is: recipe, torchvision name, file, promoted model  |
| `registry`  | torchvision's architectures and weights metadata without importing torchvision    |
| `pretrain`  | the `rtft:` backbones rtft pretrains itself, offline                              |
| `cost`      | parameters, FLOPs per image, latency at batch 1 and 32 of a built model            |

Import the modules, not this package: it exports nothing, so importing it costs nothing.
"""
