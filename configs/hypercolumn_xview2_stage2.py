"""Zoom-out hypercolumns on xView2 building footprints, stage two: dense training.

Stage two of Mostajabi et al. (2015) (stage one, and how to run both end to end:
``configs/hypercolumn_xview2_stage1.py``). The model's parameters start from stage
one's best checkpoint (``--config.model.init_from=runs/stage1``, the stage-one workdir;
a fresh optimiser and step count), and the MLP is trained on every pixel of 256x256 crops
(``config.sampled_pixels = 0``: the dense loss), so that it sees pixels next to each
other, the building edges stage one's scattered pixels rarely hit::

    python main.py --config configs/hypercolumn_xview2_stage2.py --workdir runs/stage2 \\
        --config.dataset.data_dir=~/tensorflow_datasets --config.model.init_from=runs/stage1

The VGG16 stays frozen by default (as in stage one). To fine-tune it too, unfreeze it with
``--config.frozen='()'`` (then consider a lower ``--config.learning_rate``: Adam at 1e-3
moves ImageNet weights far).

Everything else is stage one's: Adam 1e-3 constant, cross entropy with inverse class
weights, 256x256 random crops with flips, batch 16, 16 crops per decoded image. Stage two
is 18 epochs of the 2,519-image train split: an epoch is 2,519 x 16 crops / 16 per
batch = 2,519 steps, so 18 x 2,519 = 45,342 steps.
"""

import ml_collections

from configs import hypercolumn_xview2_stage1

EPOCHS = 18


def get_config() -> ml_collections.ConfigDict:
    """Stage two: from stage one's best checkpoint, dense training on 256x256 crops.

    Returns:
      The experiment config (``configs/default.py`` documents every field).
    """
    config = hypercolumn_xview2_stage1.get_config()
    # The stage-one workdir: the parameters start from its best checkpoint. Required;
    # given on the command line (--config.model.init_from=runs/stage1).
    config.model.init_from = ml_collections.config_dict.placeholder(str)
    # config.model.pretrained (stage one's) may stay: init_from replaces every parameter
    # after it is loaded, and stage one's frozen VGG16 is ImageNet's VGG16 anyway.
    config.sampled_pixels = 0  # dense: the loss sees every labelled pixel of a crop
    config.frozen = ("encoder",)  # unfreeze with --config.frozen='()'
    config.num_train_steps = EPOCHS * hypercolumn_xview2_stage1.STEPS_PER_EPOCH  # 45,342
    return config
