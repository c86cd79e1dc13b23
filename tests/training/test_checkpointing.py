"""What a checkpoint carries besides the weights."""


def test_the_fp16_grad_scaler_is_saved_and_restored(tmp_path):
    """Accelerate keeps a GradScaler for fp16 on GPUs; a checkpoint carries its scale (a CPU GradScaler stands in)."""
    import torch

    from mmgen.run_folder import RunFolder
    from mmgen.text import GPT, GPTConfig
    from mmgen.training import TrainConfig, Trainer

    def trainer(scale: float):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=11, context_length=8, num_layers=1, num_heads=2, dim=16))
        made = Trainer(model, TrainConfig(tensorboard=False, progress=False), tmp_path / "run", loss_fn=None,
                       train_dataset=[])
        made.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=7)
        return made

    first = trainer(1234.0)
    first.step = 3
    folder = first.save_checkpoint()
    assert RunFolder.read_state(folder)["grad_scaler"]["scale"] == 1234.0
    second = trainer(1.0)
    second._load_checkpoint(folder)
    assert second.step == 3 and second.accelerator.scaler.get_scale() == 1234.0
    assert second.accelerator.scaler.get_growth_interval() == 7
