"""Each tokenizer fix, on the tiny byte-level tokenizer broken in exactly one way."""
from tiny_models import (BOS, CHATML_TEMPLATE_WITH_BOS, END_OF_TEXT, EOS, PAD, RESERVED, tiny_model,
                         tiny_tokenizer)

from slothnb.models.tokenizer_fixes import ADDED_PAD, adds_bos, fix_tokenizer

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_healthy_tokenizer_needs_no_fix():
    assert fix_tokenizer(tiny_tokenizer()) == []


def test_missing_pad_uses_existing_unused_token_not_eos():
    tok = tiny_tokenizer(pad=False)
    model = tiny_model("llama", tokenizer=tiny_tokenizer())
    model.config.pad_token_id = None
    fixes = fix_tokenizer(tok, model)
    assert tok.pad_token == PAD and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id
    assert any("pad token" in f for f in fixes)


def test_pad_equal_to_eos_is_replaced():
    tok = tiny_tokenizer()
    tok.pad_token = EOS
    fix_tokenizer(tok)
    assert tok.pad_token != EOS and tok.pad_token_id != tok.eos_token_id


def test_pad_falls_back_to_reserved_token():
    tok = tiny_tokenizer(pad=False)
    tok.eos_token = PAD  # <|pad|> taken: the next free candidate is the reserved token
    tok.chat_template = None
    fix_tokenizer(tok)
    assert tok.pad_token == RESERVED


def test_pad_added_and_embeddings_resized_when_nothing_is_free():
    tok = tiny_tokenizer(pad=False)
    tok.chat_template = None
    # every candidate is taken or removed: eos=<|pad|>, bos=<|reserved_0|>, no unk
    tok.eos_token, tok.bos_token, tok.unk_token = PAD, RESERVED, None
    model = tiny_model("qwen2", tokenizer=tiny_tokenizer(), vocab_size=len(tok))
    rows = model.get_input_embeddings().num_embeddings
    fixes = fix_tokenizer(tok, model)
    assert tok.pad_token == ADDED_PAD and tok.pad_token_id == rows
    assert model.get_input_embeddings().num_embeddings == len(tok) == rows + 1
    assert model.config.pad_token_id == tok.pad_token_id
    assert any("resized" in f for f in fixes)


def test_chat_model_eos_becomes_end_of_turn_token():
    tok = tiny_tokenizer(eos=END_OF_TEXT)
    model = tiny_model("llama", tokenizer=tok)
    fixes = fix_tokenizer(tok, model)
    assert tok.eos_token == EOS
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(END_OF_TEXT)]
    assert any("eos token" in f for f in fixes)


def test_double_bos_removed_from_template():
    tok = tiny_tokenizer(add_bos=True, chat_template=CHATML_TEMPLATE_WITH_BOS)
    bos_id = tok.convert_tokens_to_ids(BOS)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert tok(text)["input_ids"][:2] == [bos_id, bos_id]  # the bug
    fixes = fix_tokenizer(tok)
    ids = tok(tok.apply_chat_template(MESSAGES, tokenize=False))["input_ids"]
    assert ids[0] == bos_id and ids.count(bos_id) == 1
    assert any("BOS" in f for f in fixes)


def test_template_bos_kept_when_tokenizer_does_not_add_it():
    tok = tiny_tokenizer(add_bos=False, chat_template=CHATML_TEMPLATE_WITH_BOS)
    assert not adds_bos(tok)
    fix_tokenizer(tok)
    assert tok.chat_template == CHATML_TEMPLATE_WITH_BOS


def test_padding_side_set_right():
    tok = tiny_tokenizer(padding_side="left")
    assert fix_tokenizer(tok) and tok.padding_side == "right"
