"""chat.py: labels are exactly the assistant turns (+ end-of-turn), image spans expand and never get cut."""

import pytest
from transformers import AutoTokenizer

from vlpost.constants import IGNORE_INDEX, IMAGE_TOKEN
from vlpost.data.chat import ChatEncoder, SampleError

TPI = 5  # tokens per image in these tests
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

CASES = {
    "single_image_before": ([
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "The circle is red."},
    ], 1),
    "image_after_question": ([
        {"role": "user", "content": "How many shapes are there?\n<image>"},
        {"role": "assistant", "content": "three"},
    ], 1),
    "multi_turn_with_system": ([
        {"role": "system", "content": "You are a helpful assistant that describes images."},
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "two shapes: a circle and a square"},
    ], 1),
    "text_only": ([
        {"role": "user", "content": "What is a square?"},
        {"role": "assistant", "content": "a shape with four equal sides"},
    ], 0),
}


def labelled_segments(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of non-ignored label ids."""
    segments, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                segments.append(current)
            current = []
        else:
            current.append(label)
    if current:
        segments.append(current)
    return segments


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_labels_decode_to_assistant_turns(tokenizer_dirs, template, case):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[template])
    messages, num_images = CASES[case]
    encoder = ChatEncoder(tokenizer, tokens_per_image=TPI, max_length=512)
    encoded = encoder.encode(messages, sample_id=case, num_images=num_images)
    assistant = [m["content"] + END[template] for m in messages if m["role"] == "assistant"]
    decoded = [tokenizer.decode(seg) for seg in labelled_segments(encoded.labels)]
    assert decoded == assistant
    # labels equal input_ids where trained (no shift in data code)
    assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(encoded.labels, encoded.input_ids))


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_image_placeholder_expands_to_tokens_per_image(tokenizer_dirs, template):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[template])
    encoder = ChatEncoder(tokenizer, tokens_per_image=TPI)
    messages, _ = CASES["single_image_before"]
    encoded = encoder.encode(messages, sample_id="x", num_images=1)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    positions = [i for i, tok in enumerate(encoded.input_ids) if tok == image_id]
    assert len(positions) == TPI and positions == list(range(positions[0], positions[0] + TPI))
    assert all(encoded.labels[i] == IGNORE_INDEX for i in positions)


def test_preference_pair_trains_only_the_completion(tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["chatml"])
    encoder = ChatEncoder(tokenizer, tokens_per_image=TPI)
    prompt = CASES["multi_turn_with_system"][0][:4]  # ends with a user turn; holds an earlier assistant turn
    encoded = encoder.encode_pair(prompt, [{"role": "assistant", "content": "one square"}], sample_id="p", num_images=1)
    assert [tokenizer.decode(s) for s in labelled_segments(encoded.labels)] == ["one square<|im_end|>"]


def test_prompt_encoding_ends_with_assistant_header(tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["chatml"])
    encoder = ChatEncoder(tokenizer, tokens_per_image=TPI)
    ids = encoder.encode_prompt(CASES["single_image_before"][0][:1], sample_id="q", num_images=1)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == TPI


def test_errors_name_the_sample(tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["chatml"])
    encoder = ChatEncoder(tokenizer, tokens_per_image=TPI)
    two = [{"role": "user", "content": "<image><image> hi"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(SampleError, match="'coco/1'.*2 <image> placeholder") as err:
        encoder.encode(two, sample_id="coco/1", num_images=1)
    assert err.value.reason == "placeholder mismatch"
    empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    with pytest.raises(SampleError, match="'e'.*empty assistant") as err:
        encoder.encode(empty, sample_id="e", num_images=0)
    assert err.value.reason == "empty assistant turn"
    no_assistant = [{"role": "user", "content": "hi"}]
    with pytest.raises(SampleError, match="'n'") as err:
        encoder.encode(no_assistant, sample_id="n", num_images=0)
    assert err.value.reason == "empty assistant mask"
    with pytest.raises(SampleError, match="role 'robot'"):
        encoder.encode([{"role": "robot", "content": "x"}], sample_id="r", num_images=0)


def test_truncation_never_cuts_an_image_span(tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["chatml"])
    messages = [{"role": "user", "content": "What colour is the circle and the square and the shapes? " + IMAGE_TOKEN},
                {"role": "assistant", "content": "red and blue " * 10}]
    full = ChatEncoder(tokenizer, tokens_per_image=TPI).encode(messages, sample_id="t", num_images=1)
    image_end = max(i for i, t in enumerate(full.input_ids) if t == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) + 1
    # cut inside the image span → dropped with a clear reason
    with pytest.raises(SampleError, match="image span") as err:
        ChatEncoder(tokenizer, tokens_per_image=TPI, max_length=image_end - 2).encode(messages, sample_id="t", num_images=1)
    assert err.value.reason == "too long"
    # cut after the image but inside the answer → truncated text, image intact, some labels left
    cut = ChatEncoder(tokenizer, tokens_per_image=TPI, max_length=image_end + 12).encode(
        messages, sample_id="t", num_images=1)
    assert len(cut) == image_end + 12 and cut.input_ids == full.input_ids[: image_end + 12]
    assert any(lab != IGNORE_INDEX for lab in cut.labels)
