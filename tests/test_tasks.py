"""Task types: what each trains on (labels), what it measures (loss, learning, exact match), and how forgetting
reads its model."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from conftest import task_of
from maskrun.data.tasks import Split, TaskData
from maskrun.data.tokenizer import train_tokenizer
from maskrun.models import boundary_ids, build_pretraining_model
from maskrun.tasks.base import token_loss

CPU = torch.device("cpu")
PROBLEMS = [(f"Tom has {a} apples and buys {b} more. How many apples does he have?\nAnswer:", f" {a + b}")
            for a, b in [(3, 4), (12, 7), (25, 30), (8, 1), (40, 2), (6, 6), (19, 11), (2, 50)]]
CODE = ["def add(a, b):\n    return a + b\n", "class Point:\n    def __init__(self, x):\n        self.x = x\n",
        "import os\nprint(os.getcwd())\n", "for i in range(10):\n    print(i * i)\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([p + r for p, r in PROBLEMS] * 3 + CODE * 3, vocab_size=200, out_dir=out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory, tokenizer):
    """A tiny causal-LM checkpoint, as the pretrain stage writes one."""
    out = tmp_path_factory.mktemp("decoder")
    mcfg = OmegaConf.create({"family": "gpt2", "objective": "causal_lm", "name_or_path": None, "hidden_size": 16,
                             "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
                             "dropout": 0.0, "dtype": "fp32"})
    torch.manual_seed(0)
    build_pretraining_model(mcfg, tokenizer).save_pretrained(out)
    return out


def instruction_task(tokenizer, problems=PROBLEMS, max_length: int = 48):
    split = Split([p for p, _ in problems], responses=[r for _, r in problems])
    data = TaskData(name="toy", label_names=[], train=split, validation=split, test=split, task_type="instruction",
                    chat_template="auto")
    return task_of(data, tokenizer, max_length)


def causal_task(tokenizer):
    data = TaskData(name="code", label_names=[], train=Split(CODE[:2]), validation=Split(CODE[2:3]),
                    test=Split(CODE[3:]), task_type="causal_lm")
    return task_of(data, tokenizer, 16)


def test_instruction_labels_cover_the_response_and_its_end_only(tokenizer):
    task = instruction_task(tokenizer)
    start, end = boundary_ids(tokenizer)
    examples = task.examples(task.data.train)
    batch = task.collate(examples)
    for row, (prompt, response) in enumerate(examples):
        answer = tokenizer(PROBLEMS[row][1], add_special_tokens=False)["input_ids"]
        assert prompt[0] == start and response == answer + [end]
        labelled = batch["labels"][row].ne(-100)
        assert batch["labels"][row][labelled].tolist() == response  # the prompt and the padding are never predicted
        assert batch["input_ids"][row][:len(prompt) + len(response)].tolist() == prompt + response
        assert batch["attention_mask"][row].sum() == len(prompt) + len(response)


def test_a_long_prompt_loses_its_beginning_and_keeps_its_cue_and_the_response(tokenizer):
    long = [("word " * 80 + PROBLEMS[0][0], PROBLEMS[0][1])]
    task = instruction_task(tokenizer, long, max_length=24)
    prompt, response = task.examples(task.data.train)[0]
    cue = tokenizer(PROBLEMS[0][0], add_special_tokens=False)["input_ids"][-6:]
    assert len(prompt) + len(response) == 24 and prompt[-6:] == cue
    assert response[:-1] == tokenizer(PROBLEMS[0][1], add_special_tokens=False)["input_ids"]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory, tokenizer):
    """The toy tokenizer with the turn markers and chat template of an instruction-tuned checkpoint."""
    out = tmp_path_factory.mktemp("chat_tokenizer")
    tokenizer.save_pretrained(out)
    chat = AutoTokenizer.from_pretrained(out)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = CHATML
    return chat


def test_with_a_chat_template_the_prompt_is_the_user_turn_and_the_response_the_assistant_turn(chat_tokenizer):
    task = instruction_task(chat_tokenizer, max_length=64)
    encode = lambda text: chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    turn_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for (prompt, response), (text, answer) in zip(task.examples(task.data.train), PROBLEMS):
        assert prompt == (encode("<|im_start|>user\n") + encode(text) + encode("<|im_end|>\n<|im_start|>assistant\n"))
        assert response == encode(answer.strip()) + [turn_end]  # the turn starts the answer: no leading space
    assert task.format.end == turn_end  # where generation stops


def test_a_chat_template_is_used_only_when_asked_and_a_tokenizer_without_one_stays_plain(chat_tokenizer, tokenizer):
    split = Split([p for p, _ in PROBLEMS], responses=[r for _, r in PROBLEMS])
    plain = TaskData(name="toy", label_names=[], train=split, validation=split, test=split, task_type="instruction",
                     chat_template=False)
    start, end = boundary_ids(chat_tokenizer)
    assert task_of(plain, chat_tokenizer, 48).format.before == [start]
    assert task_of(plain, chat_tokenizer, 48).format.end == end
    plain.chat_template = "auto"
    assert task_of(plain, tokenizer, 48).format.before == [boundary_ids(tokenizer)[0]]


def test_the_loss_is_the_mean_over_predicted_tokens(tokenizer, decoder_dir):
    task = instruction_task(tokenizer)
    model = task.load_model(decoder_dir).eval()
    batch = task.collate(task.examples(task.data.train)[:3])
    with torch.no_grad():
        expected = model(**batch).loss.item()  # transformers' own shift and mean over labelled tokens
    assert token_loss(model, [batch], CPU)["loss"] == pytest.approx(expected, rel=1e-6)


def test_batched_generation_continues_each_prompt_as_alone(tokenizer, decoder_dir):
    task = instruction_task(tokenizer)
    model = task.load_model(decoder_dir).eval()
    prompts = [prompt for prompt, _ in task.examples(task.data.test)]
    assert task.generate(model, prompts, CPU) == [task.generate(model, [p], CPU)[0] for p in prompts]


def test_exact_match_counts_generations_equal_to_the_response(tokenizer, decoder_dir):
    task = instruction_task(tokenizer)
    model = task.load_model(decoder_dir).eval()
    generated = task.generate(model, [prompt for prompt, _ in task.examples(task.data.test)], CPU)
    # Half the responses are what the model generates (up to surrounding whitespace), half something else.
    problems = [(p, f" {g} " if i % 2 else g + "x") for i, ((p, _), g) in enumerate(zip(PROBLEMS, generated))]
    result = instruction_task(tokenizer, problems).evaluate(model, "test", CPU)
    assert result["exact_match"] == 0.5 and result["prompts_cut"] == 0.0
    assert set(result) == {"loss", "perplexity", "exact_match", "exact_match_before", "prompts_cut"}
    assert result["exact_match_before"] is None  # nothing measured it before fine-tuning


def test_exact_match_before_fine_tuning_is_measured_on_the_model_as_it_starts(tokenizer, decoder_dir):
    task = instruction_task(tokenizer)
    model = task.load_model(decoder_dir).eval()
    generated = task.generate(model, [prompt for prompt, _ in task.examples(task.data.test)], CPU)
    task = instruction_task(tokenizer, [(p, g) for (p, _), g in zip(PROBLEMS, generated)])
    task.start(model, CPU)
    torch.manual_seed(1)
    with torch.no_grad():  # fine-tuning moved the model: its answers are no longer the references
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    result = task.evaluate(model, "test", CPU)
    assert result["exact_match_before"] == 1.0 > result["exact_match"]


def test_generation_reads_the_prompt_window_the_loss_reads_and_says_how_many_were_cut(tokenizer, decoder_dir):
    task = instruction_task(tokenizer, max_length=20)  # every prompt is longer than 20 tokens
    model = task.load_model(decoder_dir).eval()
    seen = []
    task.generate = lambda model, ids, device: seen.extend(ids) or [""] * len(ids)
    result = task.evaluate(model, "test", CPU)
    assert seen == [prompt for prompt, _ in task.examples(task.data.test)] and result["prompts_cut"] == 1.0


def test_an_empty_generation_never_matches_a_reference_without_an_answer(tokenizer):
    task = instruction_task(tokenizer)
    task.ecfg = OmegaConf.merge(task.ecfg, {"answer_pattern": "The answer is: (.*)"})
    assert not task.matches("", " 42") and not task.matches("The answer is: 42", " 42")
    assert task.matches("so... The answer is: 42", "worked. The answer is: 42")


def test_an_answer_pattern_compares_the_final_answers_only(tokenizer):
    task = instruction_task(tokenizer)
    task.ecfg = OmegaConf.merge(task.ecfg, {"answer_pattern": "The answer is: (.*)"})
    reference = "Add 3 and 4 to get 7. The answer is: 7"
    assert task.answer("3 + 4 = 7, so... The answer is: 7 ") == task.answer(reference) == "7"
    assert task.answer("The answer is: 6\nNo wait.\nThe answer is: 8") == "8" != task.answer(reference)
    assert task.answer("no answer given") is None != task.answer(reference)


def test_causal_lm_learning_is_the_drop_from_the_pretrained_loss(tokenizer, decoder_dir):
    task = causal_task(tokenizer)
    model = task.load_model(decoder_dir)
    task.start(model, CPU)
    unchanged = task.evaluate(model, "test", CPU)
    assert unchanged["learning"] == 0.0 and unchanged["loss"] == unchanged["loss_before"]
    assert unchanged["perplexity"] == pytest.approx(torch.tensor(unchanged["loss"]).exp().item())
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    moved = task.evaluate(model, "test", CPU)
    assert moved["loss_before"] == unchanged["loss"]
    assert moved["learning"] == pytest.approx(unchanged["loss"] - moved["loss"]) and moved["learning"] != 0.0


def test_causal_lm_blocks_are_packed_from_the_documents(tokenizer):
    task = causal_task(tokenizer)
    blocks = task.examples(task.data.train)
    assert all(len(block) == 16 for block in blocks)
    batch = task.collate(blocks)
    assert not batch["input_ids"].eq(tokenizer.pad_token_id).any() and bool(batch["attention_mask"].all())
    # Every token is predicted but the separator that closes each block at a fixed place (not a text's end).
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, :-1]) and bool(batch["labels"][:, -1].eq(-100).all())
    short = task.examples(Split(["x = 1\n"]))  # a text shorter than a block packs into one shorter block, unpadded
    assert len(short) == 1 and not short[0].eq(tokenizer.pad_token_id).any()


def test_forgetting_reads_a_language_model_task_as_it_is(tokenizer, decoder_dir):
    for task in (causal_task(tokenizer), instruction_task(tokenizer)):
        model = task.load_model(decoder_dir)
        assert task.pretraining_view(object(), model) is model


def test_the_pretraining_loss_weighs_every_predicted_token_once_whatever_the_batching(tokenizer, decoder_dir):
    # Blocks that open with an unlabelled token (a tokenizer whose pad is its start token, as with a pad set to eos)
    # and hold different numbers of labels: per-batch means must be weighted by the tokens they predict.
    from maskrun.evaluate import pretraining_loss
    from maskrun.models import load_pretraining_model

    model = load_pretraining_model(decoder_dir, "causal_lm")
    torch.manual_seed(0)
    inputs = torch.randint(5, len(tokenizer), (4, 12))
    labels = inputs.clone()
    labels[:, 0] = -100
    labels[0, 6:] = -100
    labels[2, 3:] = -100
    with torch.no_grad():
        logits = model(input_ids=inputs).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    for batch_size in (1, 3, 4):
        assert pretraining_loss(model, inputs, labels, "causal_lm", CPU, batch_size) == pytest.approx(expected.item(),
                                                                                                     rel=1e-5)


def test_gradient_checkpointing_trains_the_same_weights(tokenizer, decoder_dir):
    from importlib.resources import files

    from maskrun.finetune import finetune

    task = instruction_task(tokenizer)
    trained = []
    for checkpointing in (False, True):
        fcfg = OmegaConf.merge(OmegaConf.load(files("maskrun.conf") / "config.yaml").finetune,
                               {"epochs": 1, "batch_size": 4, "max_length": 48, "gradient_checkpointing": checkpointing})
        ocfg = OmegaConf.load(files("maskrun.conf") / "optimizer" / "adamw.yaml")
        model = task.load_model(decoder_dir)
        finetune(model, task, {}, fcfg, ocfg, CPU, seed=0)
        assert model.is_activation_checkpointing == checkpointing
        trained.append(model.state_dict())
    before = task.load_model(decoder_dir).state_dict()
    assert any(not torch.equal(trained[0][k], before[k]) for k in before)
    for name in trained[0]:
        torch.testing.assert_close(trained[1][name], trained[0][name], rtol=0, atol=1e-6, msg=name)


def test_mlm_attends_to_no_pad_its_random_replacement_drew_and_a_causal_lm_to_every_position(tokenizer):
    from maskrun.pretrain import block_attention

    blocks = torch.tensor([[2, 7, tokenizer.pad_token_id, 9, 3]])  # a [PAD] drawn as a random replacement
    assert block_attention(blocks, "mlm", tokenizer.pad_token_id).tolist() == [[True, True, False, True, True]]
    # A causal LM's blocks hold no padding: a token equal to the pad id (an end-of-text where pad is eos) is text.
    assert bool(block_attention(blocks, "causal_lm", tokenizer.pad_token_id).all())
