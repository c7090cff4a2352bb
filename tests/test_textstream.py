from edgellm.textstream import TextStream


def test_multibyte_characters_are_released_whole():
    data = "🙂 你好".encode()
    stream = TextStream()
    out = [stream.push(data[i:i + 1]) for i in range(len(data))]
    assert "".join(out) + stream.flush() == "🙂 你好"
    assert all("\ufffd" not in piece for piece in out)
    assert out[:4] == ["", "", "", "🙂"]  # nothing shown until the 4-byte emoji is whole


def test_stop_string_split_across_tokens_is_cut_and_never_shown():
    stream = TextStream(["<END>"])
    shown = [stream.push(p.encode()) for p in ["Hello <", "EN", "D> ignored"]]
    assert shown == ["Hello ", "", ""]
    assert stream.stopped


def test_held_prefix_is_released_when_it_does_not_complete():
    stream = TextStream(["###"])
    assert stream.push(b"a #") == "a "
    assert stream.push(b"#b") == "##b"
    assert stream.push(b" ##") == " "
    assert stream.flush() == "##"
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins():
    stream = TextStream(["world", "lo"])
    assert stream.push(b"hello world") == "hel"
