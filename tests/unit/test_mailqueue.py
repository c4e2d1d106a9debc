"""Which account a queued message belongs to: only the SASL login smtpd wrote
in the envelope's preamble counts (the real Postfix tests are in
e2e/test_postfix.py; these are postcat's output as it prints it)."""
from pcclib.mailqueue import recorded_sasl_login

HEAD = (b"*** ENVELOPE RECORDS deferred/B/B125620C1A2 ***\n"
        b"message_size:             325             721               1               0             325\n"
        b"message_arrival_time: Fri Dec  4 17:56:29 2026\ncreate_time: Fri Dec  4 17:56:29 2026\n"
        b"named_attribute: log_ident=B125620C1A2\nnamed_attribute: rewrite_context=local\n")
SMUGGLED = b"named_attribute: sasl_username=victim@example.com\n"


def test_the_login_smtpd_recorded_before_the_sender():
    envelope = (HEAD + b"named_attribute: sasl_method=PLAIN\nnamed_attribute: sasl_username=Alice@Example.com\n"
                b"sender: alice@example.com\nnamed_attribute: dsn_orig_rcpt=rfc822;a\n" + SMUGGLED
                + b"recipient: bob@remote.test\n")
    assert recorded_sasl_login(envelope) == "alice@example.com"


def test_a_line_printed_from_a_clients_record_counts_for_nobody():
    after_the_sender = HEAD + b"sender: spam@evil.test\nnamed_attribute: dsn_orig_rcpt=rfc822;a\n" + SMUGGLED
    in_a_full_name = HEAD + b"sender_fullname: Local User\n" + SMUGGLED + b"sender: local@example.test\n"
    assert recorded_sasl_login(after_the_sender) is None
    assert recorded_sasl_login(in_a_full_name) is None


def test_two_logins_in_the_preamble_are_nothing_postfix_writes():
    envelope = HEAD + b"named_attribute: sasl_username=alice@example.com\n" + SMUGGLED + b"sender: a@b\n"
    assert recorded_sasl_login(envelope) is None
