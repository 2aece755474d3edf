"""What the masking keeps resident for training: never more than plain fine-tuning's optimizer state, at most
(1 - r) x it plus one bit per eligible entry, and no bool mask while the pipeline's fine-tuning runs."""

import copy
import gc
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

from conftest import task_of
from maskrun.finetune import Callback, finetune
from maskrun.optim import MaskedOptimizer, TrainableEntries, pack_bits, unpack_bits, unpack_bits_with_torch
from test_finetune import half_frozen, task, tiny_model, training_configs  # noqa: F401 (task is a fixture)

ADAMW = SimpleNamespace(name="adamw", weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)


def smoke_sized_bert() -> BertForSequenceClassification:
    """The smoke preset's model shape: vocab 1000, hidden 32, one layer."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64))


def random_backbone_masks(model, ratio: float) -> dict[str, torch.Tensor]:
    """Each pretrained entry (all but the pooler and classifier) frozen with probability `ratio`."""
    generator = torch.Generator().manual_seed(0)
    return {n: torch.rand(p.shape, generator=generator) < ratio for n, p in model.named_parameters()
            if n.startswith("bert.") and "pooler" not in n}


def state_bytes_after_a_step(model, masks: dict[str, torch.Tensor]) -> int:
    optimizer = MaskedOptimizer(model, masks, ADAMW, lr=1e-3)
    inputs = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=inputs, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    optimizer.step(max_grad_norm=1.0)
    return optimizer.state_bytes()


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999])
def test_masked_state_never_exceeds_full_finetuning_and_is_within_one_bit_per_entry_of_its_share(ratio):
    base = smoke_sized_bert()
    masks = random_backbone_masks(base, ratio)
    full = state_bytes_after_a_step(copy.deepcopy(base), {})
    masked = state_bytes_after_a_step(copy.deepcopy(base), masks)
    frozen = sum(int(m.sum()) for m in masks.values())
    one_bit_per_eligible_entry = sum(-(-m.numel() // 8) for m in masks.values())  # whole bytes per tensor
    assert masked <= full
    # (1 - r) x full: full less the two fp32 moments of every frozen entry (AdamW's per-tensor step count
    # is not per entry; a tensor frozen whole drops it, a partly frozen one keeps it).
    assert masked <= full - 2 * 4 * frozen + one_bit_per_eligible_entry


def test_bits_survive_packing_whatever_the_length_with_numpy_and_with_torch():
    generator = torch.Generator().manual_seed(0)
    for length in (1, 7, 8, 9, 1001):
        bits = torch.rand(length, generator=generator) < 0.5
        packed = pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-length // 8)
        assert torch.equal(unpack_bits(packed, length), bits)  # numpy's, as on the CPU
        assert torch.equal(unpack_bits_with_torch(packed, length), bits)  # torch's, as on an accelerator


@pytest.mark.parametrize("ratio, form", [(0.01, "frozen_index"), (0.5, "bitmap"), (0.99, "trainable_index")])
def test_each_form_of_the_record_is_the_smallest_and_gives_the_ascending_trainable_index(ratio, form):
    frozen = torch.rand(37, 29, generator=torch.Generator().manual_seed(0)) < ratio  # not a whole number of bytes
    entries = TrainableEntries(frozen)
    trainable, count = (~frozen).flatten(), int((~frozen).sum())
    assert entries.form == form
    assert entries.nbytes() == min(4 * count, 4 * (frozen.numel() - count), -(-frozen.numel() // 8))
    assert torch.equal(entries.index().long(), trainable.nonzero().squeeze(1))


class BoolMasksAlive(Callback):
    """Counts, before each step, the live bool tensors shaped like one of the masks."""

    def __init__(self, shapes: set[torch.Size]):
        self.shapes, self.counts = shapes, []

    def on_step_begin(self, step, model, optimizer) -> None:
        gc.collect()
        self.counts.append(sum(1 for obj in gc.get_objects()
                               if type(obj) is torch.Tensor and obj.dtype == torch.bool and obj.shape in self.shapes))


def test_fine_tuning_from_the_mask_file_holds_no_bool_mask_and_trains_the_same(tokenizer, task, tmp_path):
    fcfg, ocfg = training_configs(epochs=1)
    from_file, from_dict = tiny_model(tokenizer), tiny_model(tokenizer)
    masks = half_frozen(from_file)
    save_file(masks, tmp_path / "mask.safetensors")
    shapes = {m.shape for m in masks.values()}
    data = task_of(task, tokenizer, fcfg.max_length)

    watch_dict = BoolMasksAlive(shapes)
    finetune(from_dict, data, masks, fcfg, ocfg, torch.device("cpu"), seed=0, callbacks=[watch_dict])
    del masks
    watch_file = BoolMasksAlive(shapes)
    finetune(from_file, data, tmp_path / "mask.safetensors", fcfg, ocfg, torch.device("cpu"), seed=0,
             callbacks=[watch_file])

    assert watch_dict.counts and min(watch_dict.counts) > 0  # the watch sees masks that the caller holds
    assert watch_file.counts and max(watch_file.counts) == 0
    for (name, a), b in zip(from_file.state_dict().items(), from_dict.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs between the mask file and the same masks given as a dict"
