"""The named errors' helpers."""

from mtlxray.errors import error_line


def test_error_line_is_the_first_non_empty_line_of_a_multi_line_message():
    assert error_line(RuntimeError("\n  Error(s) in loading state_dict:\n\tMissing key(s): a.b\n")) == \
        "Error(s) in loading state_dict:"


def test_error_line_of_an_empty_message_is_the_type_name_or_the_default():
    assert error_line(KeyError()) == "KeyError"
    assert error_line(ValueError(""), default="") == ""
