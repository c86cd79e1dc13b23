"""DeferredStop: stop signals become a flag checked between steps; a second Ctrl-C stops at once."""

import os
import signal

import pytest

from mmgen.training.interrupts import EXIT_INTERRUPTED, EXIT_PREEMPTED, DeferredStop, ignore_stop_signals


@pytest.mark.parametrize("number, exit_code, name", [(signal.SIGINT, EXIT_INTERRUPTED, "Ctrl-C"),
                                                     (signal.SIGTERM, EXIT_PREEMPTED, "SIGTERM"),
                                                     (signal.SIGUSR1, EXIT_PREEMPTED, "SIGUSR1")])
def test_a_signal_only_sets_the_flag_and_handlers_are_restored(number, exit_code, name):
    before = signal.getsignal(number)
    with DeferredStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), number)  # would end the process (SIGTERM, SIGUSR1) without the handler
        assert stop.requested == number and stop.exit_code() == exit_code and stop.name() == name
    assert signal.getsignal(number) is before


def test_a_second_ctrl_c_stops_at_once():
    with pytest.raises(KeyboardInterrupt):
        with DeferredStop() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second Ctrl-C did not interrupt")


def test_data_loader_workers_leave_stop_signals_to_the_main_process():
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(number) is signal.SIG_IGN for number in previous)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_fp16_on_cpu_says_once_that_it_trains_in_fp32(capsys):
    from mmgen.text import GPT, GPTConfig
    from mmgen.training import TrainConfig, Trainer

    model = GPT(GPTConfig(vocab_size=11, context_length=8, num_layers=1, num_heads=2, dim=16))
    Trainer(model, TrainConfig(mixed_precision="fp16"), "unused", loss_fn=None, train_dataset=[])
    lines = [line for line in capsys.readouterr().err.splitlines() if "fp16" in line]
    assert len(lines) == 1 and "no effect on CPU" in lines[0]

