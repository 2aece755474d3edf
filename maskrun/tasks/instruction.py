"""Instruction tuning: prompt → response, the loss over the response tokens only; exact match of greedy generations.

An example is the start token, the prompt, the response and the end-of-text token, in at most `max_length`
tokens (a long prompt loses its beginning, so its closing cue stays); prompt positions carry label −100, as
the decoder-input masking of instruction tuning does. Generation is greedy from the prompt, for at most
`eval.max_new_tokens` tokens or until end of text, from the same prompt window as the loss (`prompts_cut`: the
share of prompts that lost their beginning); a generation matches when it equals the response up to
surrounding whitespace — or, with `eval.answer_pattern` (a regex with one group), when the last match of the
group in each is the same (the final answer of a worked solution).
"""

import re

import torch

from maskrun.models import boundary_ids
from maskrun.tasks.base import DecoderTask, pad_right, token_loss


class Instruction(DecoderTask):
    METRIC = "exact_match"

    def window(self, prompt: list[int], room: int) -> list[int]:
        """The start token and the prompt, cut from the left to leave `room` of the max_length tokens free."""
        start, _ = boundary_ids(self.tokenizer)
        return [start] + prompt[max(0, 1 + len(prompt) + room - self.max_length):]

    def examples(self, split):
        _, end = boundary_ids(self.tokenizer)
        prompts = self.tokenizer(split.texts, add_special_tokens=False)["input_ids"]
        responses = self.tokenizer(split.responses, add_special_tokens=False)["input_ids"]
        # A response longer than the window keeps its beginning.
        responses = [(r + [end])[:self.max_length - 1] for r in responses]
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
        _, end = boundary_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        width = max(map(len, ids))
        inputs = torch.tensor([[pad] * (width - len(p)) + p for p in ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=device)
        out = model.generate(input_ids=inputs, attention_mask=attention_mask, max_new_tokens=self.ecfg.max_new_tokens,
                             do_sample=False, eos_token_id=end, pad_token_id=pad)
        new = out[:, width:].tolist()
        return [self.tokenizer.decode(row[:row.index(end)] if end in row else row, skip_special_tokens=True)
                for row in new]

    def evaluate(self, model, split, device):
        data, size = getattr(self.data, split), self.ecfg.batch_size
        model.eval()
        examples = self.examples(data)
        result = token_loss(model, (self.collate(examples[i:i + size]) for i in range(0, len(examples), size)), device)
        # Generation starts from the very prompt the loss reads (the same window), never a shorter one.
        prompts = [prompt for prompt, _ in examples]
        generated = [text for i in range(0, len(prompts), size) for text in self.generate(model, prompts[i:i + size], device)]
        matches = sum(self.matches(g, r) for g, r in zip(generated, data.responses))
        full = self.tokenizer(data.texts, add_special_tokens=False)["input_ids"]
        cut = sum(len(prompt) - 1 < len(whole) for prompt, whole in zip(prompts, full))
        return result | {"exact_match": matches / len(data), "prompts_cut": cut / len(data)}

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
