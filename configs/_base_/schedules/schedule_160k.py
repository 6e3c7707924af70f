# 160k iterations for 16 images per iteration (8 GPUs x 2): AdamW lr 1e-4 with layer-wise decay 0.65, 1500 linear
# warm-up iterations, then linear decay to 0 (the BEiT/MAE UperNet recipe of mmseg).
optim_wrapper = dict(
    type="OptimWrapper",
    constructor="TokenZooLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(decay_rate=0.65),
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=1500, end=160000),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=160000, val_interval=16000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=16000, max_keep_ckpts=3, save_last=True),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)
auto_scale_lr = dict(enable=False, base_batch_size=16)
