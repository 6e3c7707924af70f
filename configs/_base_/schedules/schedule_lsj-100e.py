# ViTDet's 100-epoch LSJ schedule for 16 images per iteration (8 GPUs x 2): 737,500 iterations (ViTDet's 184,375 at
# 64 images x 4), AdamW lr 1e-4 with layer-wise decay 0.7, lr x0.1 at 88.9% and 96.3%, 1000 warm-up iterations.
optim_wrapper = dict(
    type="OptimWrapper",
    constructor="TokenZooLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(decay_rate=0.7),
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=737500, milestones=[655556, 710184], gamma=0.1),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=737500, val_interval=20000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=20000, max_keep_ckpts=3, save_last=True),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)
# --cfg-options auto_scale_lr.enable=True scales the lr linearly when the total batch is not 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)
