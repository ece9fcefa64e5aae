"""The service layer: what every front end (nodes, CLI, studio) calls, and nothing else does.

- `models`: find and load checkpoints and aggregators (one loader), build AFA ensembles from an
  `EnsembleSpec` (`load_ensemble`) or from loaded MODELs (`ensemble_of_models`), the experts of
  a training run (`experts_of`, `experts_from_files`);
- `sampling`: the one sampling sequence (`sample`) and its settings;
- `maps`: recording and rendering the aggregator's weight maps;
- `training`: training and evaluating an aggregator.

Front ends import these modules (`from afa_nodes.service import models`), never each other.
"""
