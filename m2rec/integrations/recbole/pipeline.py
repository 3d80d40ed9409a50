"""RecBole's own pipeline for M2Rec, as chengkai-liu/Mamba4Rec's ``run.py`` runs Mamba4Rec: ``Config`` with
the model class (``run_recbole`` would look the name up among RecBole's models), ``create_dataset``,
``data_preparation``, ``Trainer.fit``, then the test evaluation of the best checkpoint.

Reloading that checkpoint: RecBole 1.2.1's ``Trainer.evaluate(load_best_model=True)`` calls
``torch.load`` without ``weights_only``; since torch 2.6 that defaults to ``weights_only=True``, which
refuses RecBole's checkpoint (it pickles the ``Config``). ``load_trainer_checkpoint`` loads it explicitly
with ``weights_only=False`` (the file this process just wrote) and the evaluation then runs with
``load_best_model=False``. Nothing in RecBole or torch is patched.
"""
from __future__ import annotations

import inspect
import sys
from logging import getLogger
from typing import Any, Dict, Optional, Sequence

import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.trainer import Trainer
from recbole.utils import init_logger, init_seed, set_color

from .model import DEFAULT_CONFIG_FILE, M2Rec


def m2rec_config(dataset: Optional[str] = None, config_file_list: Sequence[str] = (),
                 config_dict: Optional[Dict[str, Any]] = None) -> Config:
    """RecBole ``Config`` for M2Rec: ``DEFAULT_CONFIG_FILE`` first, then ``config_file_list``, then
    ``config_dict``, then ``--key=value`` options on the command line (RecBole's own precedence)."""
    return Config(model=M2Rec, dataset=dataset, config_file_list=[DEFAULT_CONFIG_FILE, *config_file_list],
                  config_dict=config_dict)


def load_trainer_checkpoint(trainer: Trainer, checkpoint_file: Optional[str] = None) -> Dict[str, Any]:
    """Load the checkpoint RecBole's ``Trainer`` saved (by default its best-validation one,
    ``trainer.saved_model_file``) into ``trainer.model``. ``weights_only=False`` because RecBole pickles
    its ``Config`` into the file: load only checkpoints you trust, such as the ones your own run wrote."""
    path = checkpoint_file or trainer.saved_model_file
    checkpoint = torch.load(path, map_location=trainer.device, weights_only=False)
    trainer.model.load_state_dict(checkpoint["state_dict"])
    trainer.model.load_other_parameter(checkpoint.get("other_parameter"))
    return checkpoint


def run(config: Config, log_to_file: bool = True) -> Dict[str, Any]:
    """Train M2Rec with RecBole's ``Trainer`` and test the best checkpoint. Returns the results
    (``best_valid_score``, ``best_valid_result``, ``test_result``, ``checkpoint``) and the objects
    (``dataset``, ``train_data``, ``valid_data``, ``test_data``, ``model``, ``trainer``).
    ``log_to_file``: RecBole's ``init_logger`` (log/ under the working directory)."""
    init_seed(config["seed"], config["reproducibility"])
    if log_to_file:
        init_logger(config)
    logger = getLogger()
    logger.info(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = M2Rec(config, train_data.dataset).to(config["device"])
    logger.info(model)
    trainer = Trainer(config, model)
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=True,
                                                      show_progress=config["show_progress"])
    load_trainer_checkpoint(trainer)
    test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=config["show_progress"])
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    return {"best_valid_score": best_valid_score, "best_valid_result": dict(best_valid_result),
            "test_result": dict(test_result), "checkpoint": trainer.saved_model_file,
            "dataset": dataset, "train_data": train_data, "valid_data": valid_data, "test_data": test_data,
            "model": model, "trainer": trainer}


def main() -> int:
    """python -m m2rec.integrations.recbole --dataset=NAME [--config_files="a.yaml b.yaml"] [--key=value ...]

    Trains M2Rec with RecBole's Trainer on <data_path>/NAME (ml-100k: the copy inside the recbole
    wheel) and tests the best checkpoint. Every --key=value is a RecBole config option, read from the
    command line by RecBole's Config itself; defaults: m2rec/integrations/recbole/m2rec.yaml."""
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(inspect.cleandoc(main.__doc__))
        return 0
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    files = options.get("config_files", "").split()
    config = m2rec_config(config_file_list=files)
    result = run(config)
    print({k: result[k] for k in ("best_valid_result", "test_result", "checkpoint")})
    return 0
