# A short schedule for the synthetic sets (a smoke run on one machine, CPU included): 200 iterations, AdamW lr 2e-4
# with layer-wise decay 0.7, 20 warm-up iterations, lr x0.1 at iteration 150; evaluates and saves every 100.
optim_wrapper = dict(
    type="OptimWrapper",
    constructor="TokenZooLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(decay_rate=0.7),
    optimizer=dict(type="AdamW", lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=200, milestones=[150], gamma=0.1),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=200, val_interval=100)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=100, max_keep_ckpts=2, save_last=True),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)
