"""The service layer: what every front end (nodes, CLI, studio) calls, and nothing else does.

- `models`: find and load checkpoints and aggregators (one loader), build AFA ensembles from an
  `EnsembleSpec` (`load_ensemble`) or from loaded MODELs (`ensemble_of_models`), the experts of
  a training run (`experts_of`, `experts_from_files`);
- `split_files`: DiTs shared as split files (diffusion models + text encoder(s) + VAE) for
  generation (`load_split_files`) and training (`experts_from_split_files`);
- `sampling`: the one sampling sequence (`sample`) and its settings;
- `maps`: recording and rendering the aggregator's weight maps;
- `training`: training and evaluating an aggregator (with sample images);
- `winmap`: win maps and held-out evaluation.

Front ends import these modules (`from afa_nodes.service import models`), never each other.
"""
