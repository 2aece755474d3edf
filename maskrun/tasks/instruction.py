"""Instruction tuning: prompt → response, the loss over the response tokens only; exact match of greedy generations.

An example is the start token, the prompt, the response and the end-of-text token, in at most `max_length`
tokens (a long prompt loses its beginning, so its closing cue stays); prompt positions carry label −100, as
the decoder-input masking of instruction tuning does. Generation is greedy from the prompt, for at most
`eval.max_new_tokens` tokens or until end of text, from the same prompt window as the loss (`prompts_cut`: the
share of prompts that lost their beginning); a generation matches when it equals the response up to
surrounding whitespace — or, with `eval.answer_pattern` (a regex with one group), when the last match of the
group in each is the same (the final answer of a worked solution).

With `dataset.chat_template=auto` and a tokenizer that has a chat template (an instruction-tuned checkpoint's), the
prompt is the user's turn in that template, ending with the cue for the assistant's turn, and the response is the
assistant's turn, ended by the template's own end-of-turn token, where generation stops too. The exact match
before fine-tuning (`exact_match_before`) says where learning starts from.
"""

import re
from dataclasses import dataclass

import torch

from maskrun.models import boundary_ids
from maskrun.tasks.base import DecoderTask, pad_right, token_loss


# Stands for a message's text while a chat template is rendered, to find what the template puts around it.
PLACEHOLDER = "\x00message\x00"


@dataclass(frozen=True)
class PromptFormat:
    """What surrounds a prompt's tokens (`before`, `after`) and ends a response (`end`)."""
    before: list[int]
    after: list[int]
    end: int
    strip_response: bool  # a chat turn starts on its own: the response's leading space goes


def prompt_format(tokenizer, chat_template) -> PromptFormat:
    """Plain: the start token, the prompt, the response and end of text. Chat: the template's user turn around the
    prompt and its cue for the assistant, the response, and the token the template ends the assistant's turn with."""
    start, end = boundary_ids(tokenizer)
    if chat_template != "auto" or not tokenizer.chat_template:
        return PromptFormat([start], [], end, strip_response=False)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    user = [{"role": "user", "content": PLACEHOLDER}]
    before, after = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False).split(PLACEHOLDER)
    turn = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": PLACEHOLDER}], tokenize=False)
    return PromptFormat(encode(before), encode(after), encode(turn.split(PLACEHOLDER)[-1])[0], strip_response=True)


class Instruction(DecoderTask):
    METRIC = "exact_match"

    def __init__(self, data, tokenizer, max_length, ecfg):
        super().__init__(data, tokenizer, max_length, ecfg)
        self.format = prompt_format(tokenizer, data.chat_template)
        self.exact_match_before: dict[str, float] = {}

    def window(self, prompt: list[int], room: int) -> list[int]:
        """The prompt in its format, cut from the left to leave `room` of the max_length tokens free."""
        fixed = len(self.format.before) + len(self.format.after)
        return self.format.before + prompt[max(0, fixed + len(prompt) + room - self.max_length):] + self.format.after

    def examples(self, split):
        prompts = self.tokenizer(split.texts, add_special_tokens=False)["input_ids"]
        texts = [r.strip() for r in split.responses] if self.format.strip_response else split.responses
        responses = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # A response longer than the window keeps its beginning.
        room = self.max_length - len(self.format.before) - len(self.format.after)
        responses = [(r + [self.format.end])[:room] for r in responses]
        return [(self.window(p, len(r)), r) for p, r in zip(prompts, responses)]

    def collate(self, examples):
        pad = self.tokenizer.pad_token_id
        ids = pad_right([p + r for p, r in examples], pad)
        labels = pad_right([[-100] * len(p) + r for p, r in examples], -100)
        attention_mask = pad_right([[1] * (len(p) + len(r)) for p, r in examples], 0)
        return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}

    @torch.no_grad()
    def generate(self, model, ids: list[list[int]], device: torch.device) -> list[str]:
        """Greedy generations from the prompts' token ids, left-padded so that each continues right after its own
        prompt."""
        end, pad = self.format.end, self.tokenizer.pad_token_id
        width = max(map(len, ids))
        inputs = torch.tensor([[pad] * (width - len(p)) + p for p in ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=device)
        out = model.generate(input_ids=inputs, attention_mask=attention_mask, max_new_tokens=self.ecfg.max_new_tokens,
                             do_sample=False, eos_token_id=end, pad_token_id=pad)
        new = out[:, width:].tolist()
        return [self.tokenizer.decode(row[:row.index(end)] if end in row else row, skip_special_tokens=True)
                for row in new]

    def start(self, model, device):
        self.exact_match_before = {split: self.exact_match(model, split, device) for split in ("validation", "test")}

    def exact_match(self, model, split: str, device: torch.device) -> float:
        """The share of the split's prompts whose greedy generation matches the response."""
        data, size = getattr(self.data, split), self.ecfg.batch_size
        model.eval()
        # Generation starts from the very prompt the loss reads (the same window), never a shorter one.
        prompts = [prompt for prompt, _ in self.examples(data)]
        generated = [text for i in range(0, len(prompts), size) for text in self.generate(model, prompts[i:i + size], device)]
        return sum(self.matches(g, r) for g, r in zip(generated, data.responses)) / len(data)

    def evaluate(self, model, split, device):
        data, size = getattr(self.data, split), self.ecfg.batch_size
        model.eval()
        examples = self.examples(data)
        result = token_loss(model, (self.collate(examples[i:i + size]) for i in range(0, len(examples), size)), device)
        full = self.tokenizer(data.texts, add_special_tokens=False)["input_ids"]
        fixed = len(self.format.before) + len(self.format.after)
        cut = sum(len(prompt) - fixed < len(whole) for (prompt, _), whole in zip(examples, full))
        return result | {"exact_match": self.exact_match(model, split, device),
                         "exact_match_before": self.exact_match_before.get(split), "prompts_cut": cut / len(data)}

    def matches(self, generated: str, response: str) -> bool:
        """A reference without an answer matches nothing (so an empty generation cannot match it)."""
        answer = self.answer(response)
        return answer is not None and self.answer(generated) == answer

    def answer(self, text: str) -> str | None:
        """What exact match compares: the text, or the last match of eval.answer_pattern's group (None: no answer)."""
        if self.ecfg.answer_pattern is None:
            return text.strip()
        found = re.findall(self.ecfg.answer_pattern, text)
        return found[-1].strip() if found else None


def build(data, tokenizer, max_length, ecfg) -> Instruction:
    return Instruction(data, tokenizer, max_length, ecfg)
