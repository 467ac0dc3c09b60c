"""Replies (mta/reply.py): their wire form, kept once made."""

from __future__ import annotations


def test_a_reply_keeps_its_wire_forms_apart_and_compares_by_its_fields() -> None:
    import pickle

    from mta.reply import Reply, greeting
    ok = Reply(250, "2.1.0", "sender OK")
    assert ok.render() == b"250 2.1.0 sender OK\r\n"
    assert ok.render(False) == b"250 sender OK\r\n"  # once both were made, each stays itself
    assert ok.render() == b"250 2.1.0 sender OK\r\n" and ok.render(False) == b"250 sender OK\r\n"
    twin = Reply(250, "2.1.0", "sender OK")
    assert twin == ok and hash(twin) == hash(ok)  # the kept forms are not fields
    assert pickle.loads(pickle.dumps(ok)) == ok
    many = Reply(250, None, "mx.test", "PIPELINING")
    assert many.render() == b"250-mx.test\r\n250 PIPELINING\r\n"
    assert greeting("a.test") is greeting("a.test")
    assert greeting("b.test").render() == b"220 b.test ESMTP mta ready\r\n"
