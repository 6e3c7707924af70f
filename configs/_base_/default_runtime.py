# Runtime shared by detection and segmentation. The task (default_scope, visualizer) comes with the model fragment,
# the hooks with the schedule.
custom_imports = dict(imports=["tokenzoo.mm"], allow_failed_imports=False)  # registers TokenZooViT & co.
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
log_processor = dict(type="LogProcessor", window_size=50, by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
