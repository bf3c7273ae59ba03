"""The paper's defaults (docs/method.md#paper-settings); every other config imports this and
overrides.

Run:    python launch.py --config configs/base.py   (the workdir defaults to runs/<config name>)
Result: base.py alone is CoMatch+Triplet on UCM10 with the paper's settings; see
        configs/ucm10_triplet.py for the documented paper run.

Config argument ``:smoke`` (``configs/x.py:smoke``) shrinks the model width, the batch and the
number of steps so that a run finishes on a 2-core CPU in about a minute.
"""

import os

import ml_collections

# The paper's datasets: (root sub-folder of $SSL_JAX_DATA, shipped split-list prefix, classes).
# Class order is the paper's label order (alphabetical by the original folder names).
UCM10_CLASSES = (
    "baseballdiamond",
    "buildings",
    "denseresidential",
    "freeway",
    "golfcourse",
    "mediumresidential",
    "mobilehomepark",
    "overpass",
    "sparseresidential",
    "tenniscourt",
)
AID10_CLASSES = (
    "Airport",
    "BareLand",
    "Desert",
    "Meadow",
    "Mountain",
    "Park",
    "Playground",
    "RailwayStation",
    "Resort",
    "Stadium",
)


def default_data_root(subfolder: str) -> str:
    """`$SSL_JAX_DATA/<subfolder>`, or '' when unset (the data layer then explains)."""
    base = os.environ.get("SSL_JAX_DATA", "")
    return os.path.join(base, subfolder) if base else ""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # N > 1 trains seeds seed ... seed+N-1 together in one jitted program (the train state
    # vmapped over a leading seed axis; needs augment.where=device). Each seed is the run it
    # would be alone (own init, labelled draw, data order, augmentation keys); all share the
    # train/test split and unlabelled pool, which for seeded splits (data.split_lists="") is
    # the split of config.seed. Each seed's files go to <workdir>/seed_<s>/; one checkpoint
    # holds the stacked state. Measure the gain: benchmarks/loop_throughput.py --seeds N.
    # Per-seed weights make vmapped convolutions grouped convolutions: on the 2-core CPU one
    # program of N = 2 / 4 seeds ran at 0.82x / 0.96x the speed of the same seeds trained one
    # after another at 1/16 width, 0.73x / 0.65x at full width (benchmarks/RESULTS.md); there,
    # run seeds as separate workdirs
    # (--config.seed=s) and group them with `python -m ssl_jax.report`, which treats both
    # layouts alike.
    config.num_seeds = 1
    # float32 | bf16: bf16 computes the network in bfloat16; parameters, optimizer state,
    # BatchNorm statistics, softmaxes, the memory bank and all loss math stay float32.
    config.precision = "float32"

    # ----------------------------------------------------------------------------- data
    config.data = data = ml_collections.ConfigDict()
    # A label for tables and logs. A paper dataset's name on other data (another data.root,
    # no shipped split lists, or tfds) gives way to the folder's or tfds name (dataset_name).
    data.name = "ucm10"
    data.source = "folder"  # folder | tfds
    data.root = default_data_root("ucm")  # folder-per-class dataset root
    # Split lists: a shipped name ("UCM"/"AID": ssl_jax/data/split_lists/<name>_{train,test}.txt),
    # a path prefix of the user's own lists, or "" for a seeded per-class split of the folder.
    data.split_lists = "UCM"
    data.test_fraction = 0.5  # only for split_lists == "": fraction of each class held out
    data.classes = UCM10_CLASSES  # class folder names in label order; () = all sub-folders, sorted
    data.tfds_name = ""  # e.g. "uc_merced" or "eurosat/rgb" (data.source == "tfds")
    data.tfds_data_dir = ""  # tfds data_dir; "" = tfds default (~/tensorflow_datasets)
    data.tfds_train_split = "train"
    data.tfds_test_split = ""  # "" = seeded per-class split of tfds_train_split by test_fraction
    # Labelled/unlabelled protocol (docs/method.md#protocols, docs/method.md#q1-labelled-set-size,
    # docs/method.md#q2-unlabelled-pool):
    #   k_per_class: a seeded draw of labels_per_class images per class from the train split;
    #                unlabelled = the whole train split (labelled ones included).
    #   seed_code:   what the reference code did: labelled = the whole train list,
    #                unlabelled = train + test lists (or every image in the folder, below).
    data.protocol = "k_per_class"
    data.labels_per_class = 4
    data.unlabelled_whole_folder = False  # seed_code only: every image under root, as the scan did
    data.image_size = 64  # Resize(64): shorter side to 64
    data.crop_size = 60
    data.batch_size = 32  # labelled batch B
    data.mu = 7  # unlabelled batch = mu * B
    data.eval_batch_size = 32
    data.workers = -1  # grain worker processes for host augmentation; -1 = number of cores
    data.cache_dir = ""  # "" = <workdir>/cache; "none" = memory only

    # ------------------------------------------------------------------------ augmentation
    config.augment = augment = ml_collections.ConfigDict()
    augment.where = "auto"  # host | device | auto (device on GPU/TPU, host on CPU)
    # docs/method.md#q3-unnormalised-strong1-view: the paper feeds the colour-jitter view
    # un-normalised
    augment.normalize_strong1 = False
    augment.randaugment_n = 2
    augment.randaugment_m = 10
    augment.cutout = 16  # docs/method.md#q12-cutout-size: constant nominal size (17x17 drawn)

    # ------------------------------------------------------------------------------ model
    config.model = model = ml_collections.ConfigDict()
    model.name = "resnet18"  # resnet18 | resnet50 | wrn28_2
    model.width = 1.0  # channel multiplier; < 1 only for tiny test/smoke models
    model.low_dim = 64  # projection dimension D
    # Convolution formulation: auto | lax | patches | hybrid | dense | taps (the last four are
    # CPU plans, ssl_jax/models/cpu_conv.py). auto: CPU plans on the CPU platform, lax elsewhere.
    model.conv_impl = "auto"

    # -------------------------------------------------------------------------- algorithm
    config.algorithm = alg = ml_collections.ConfigDict()
    alg.name = "comatch_triplet"  # supervised | fixmatch | fixmatch_ccssl | comatch |
    #                               comatch_ccssl | comatch_triplet
    alg.threshold = 0.95  # tau: pseudo-label confidence threshold (>=)
    alg.lambda_u = 1.0  # unsupervised classification loss weight
    # CoMatch (docs/method.md#comatch)
    alg.queue_batch = 5  # memory bank holds queue_batch * (mu + 1) * B rows
    alg.contrast_threshold = 0.8  # pseudo-label graph edge threshold
    alg.da_len = 32  # distribution-alignment history length
    alg.T = 0.2  # memory-smoothing and embedding-similarity temperature
    alg.alpha = 0.9  # weight of the model's own prediction in memory smoothing
    alg.lambda_c = 1.0  # graph-contrastive loss weight
    # CoMatch+Triplet (docs/method.md#triplet-loss)
    alg.lambda_dml = 1.0
    alg.triplet_margin = 0.2
    # CCSSL class-aware contrastive loss (docs/method.md#ccssl): lambda_supcon (CoMatch+CCSSL) and
    # lambda_contrast (FixMatch+CCSSL) are both this weight, the paper's lambda_c of Table I.
    alg.lambda_ccssl = 1.0
    alg.supcon_temperature = 0.07
    # 0: in-distribution (no selection); 0.9: out-of-distribution
    # (docs/method.md#id-and-od-settings)
    alg.t_push = 0.0
    # one | confidence_squared (docs/method.md#q5-ccssl-diagonal-weight: pre-Dec-2022 revisions)
    alg.ccssl_diag_weight = "one"
    # FixMatch (docs/method.md#fixmatch)
    alg.fixmatch_T = 1.0  # softmax temperature of the pseudo-labels

    # --------------------------------------------------------------------------- optimiser
    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 0.03
    optim.momentum = 0.9
    optim.nesterov = True
    optim.weight_decay = 5e-4
    optim.warmup_steps = 0
    optim.num_cycles = 7.0 / 16.0  # cosine schedule stops at cos(7*pi/16) of the base lr

    config.ema = ema = ml_collections.ConfigDict()
    ema.decay = 0.999

    # ---------------------------------------------------------------------------- training
    config.train = train = ml_collections.ConfigDict()
    train.total_steps = 524_288  # 512 epochs of 1024 steps
    train.steps_per_epoch = 1024  # "eval_step": one EMA evaluation per epoch
    train.log_every = 128  # must divide checkpoint_every and steps_per_epoch
    train.checkpoint_every = 1024
    # K training steps per dispatch: one jitted jax.lax.scan runs K steps on the device, with
    # the logged values summed inside it, so the host visits once per K steps. A K set here
    # must divide log_every, steps_per_epoch, checkpoint_every and total_steps (logging,
    # evaluation and checkpoints fall between dispatches; the error names what to change).
    # 0 = automatic: the largest K that divides all four and is at most 64 with on-device
    # augmentation (a block is a few kB of sample indices) or 8 with host augmentation (a
    # block holds K augmented batches). Any K trains the same function (ssl_jax/dispatch.py).
    # On a CPU the scan body's convolutions are rewritten into XLA:CPU's canonical order
    # (ssl_jax/loop_convolutions.py): inside a loop XLA:CPU otherwise runs autodiff's gradient
    # convolutions up to ~36x slower than in a step jitted alone.
    train.steps_per_dispatch = 0
    train.keep_checkpoints = 3  # the latest N are kept, plus the best by EMA top-1
    # "Mean top-1 acc": mean of the last N evaluations (docs/method.md#evaluation)
    train.mean_of_last = 20
    # Save the test embeddings after these (1-based) epochs, for t-SNE panels over training
    # (the paper's Fig. 6); -1 means the last epoch.
    train.save_embeddings_epochs = ()
    # Dotted keys a resume may change on purpose, e.g. '("optim.lr",)' to continue from the
    # last good checkpoint with a lower learning rate after the NaN guard stopped a run. Any
    # other change of a workdir's config is refused; accepted changes are recorded in
    # metrics.jsonl (a "resume_changes" row) and config.json holds the new values.
    train.resume_changes = ()

    # --------------------------------------------------------------------- eval / predict
    config.eval = ev = ml_collections.ConfigDict()
    ev.step = "latest"  # latest | best | an integer step
    ev.online = False  # also evaluate the online (non-EMA) weights
    ev.tsne_perplexity = 30.0
    ev.figures = True  # False: no PNG figures and no t-SNE (metrics and predictions still)
    # --mode train evaluates the final checkpoint when it ends (eval/<step>/: metrics.json,
    # predictions.npz, figures); False skips that whole post-training evaluation.
    ev.after_training = True

    config.predict = pred = ml_collections.ConfigDict()
    pred.input = ""  # an image file or a folder of images
    pred.output = ""  # "" = <workdir>/predictions.csv
    # Which seed of a num_seeds > 1 run predicts: -1 = the best by EMA top-1 at the checkpoint.
    pred.seed = -1

    return apply_arg(config, arg)


DATASETS = {
    # name: (root sub-folder of $SSL_JAX_DATA, shipped split lists, classes in label order)
    "ucm10": ("ucm", "UCM", UCM10_CLASSES),
    "aid10": ("aid", "AID", AID10_CLASSES),
    "ucm21": ("ucm", "", ()),  # the full datasets: every class folder, seeded 50/50 split
    "aid30": ("aid", "", ()),
}


def use_dataset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Points `config.data` at one of the paper's datasets (UCM10/AID10 with the paper's lists)."""
    subfolder, split_lists, classes = DATASETS[name]
    config.data.name = name
    config.data.root = default_data_root(subfolder)
    config.data.split_lists = split_lists
    config.data.classes = classes
    return config


def use_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Sets the algorithm and the paper's Table I settings for it (docs/method.md#ccssl-settings,
    docs/method.md#baseline-settings)."""
    alg = config.algorithm
    if method == "ccssl_id":  # CoMatch+CCSSL, in-distribution: tau 0.95, lambda 1, T_push 0, mu 5
        alg.name, alg.threshold, alg.lambda_ccssl, alg.t_push = "comatch_ccssl", 0.95, 1.0, 0.0
        config.data.mu = 5
    elif method == "ccssl_od":  # out-of-distribution: tau 0.6, lambda 2, T_push 0.9, mu 7
        alg.name, alg.threshold, alg.lambda_ccssl, alg.t_push = "comatch_ccssl", 0.6, 2.0, 0.9
        config.data.mu = 7
    elif method == "fixmatch_ccssl":  # FixMatch+CCSSL, ID setting (OD: see the config docstring)
        alg.name, alg.threshold, alg.lambda_ccssl, alg.t_push = "fixmatch_ccssl", 0.95, 1.0, 0.0
    elif method == "triplet":
        alg.name = "comatch_triplet"
    else:
        alg.name = method
    return config


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies the config argument (`:smoke`); an unknown argument is an error."""
    for part in (arg or "").split(","):
        if part == "smoke":
            smoke(config)
        elif part:
            raise ValueError(f"Unknown config argument {part!r}; known: 'smoke'.")
    return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A tiny variant that finishes on a 2-core CPU in about a minute (same code paths)."""
    config.model.width = 0.125
    config.data.batch_size = 8
    config.data.mu = 2
    config.data.eval_batch_size = 100
    config.data.workers = 0
    config.train.total_steps = 48
    config.train.steps_per_epoch = 16
    config.train.log_every = 8
    config.train.checkpoint_every = 16
    config.algorithm.queue_batch = 2
    config.ema.decay = 0.9  # so that 48 steps move the evaluated EMA model at all
    return config
