from promptopt_dagster.redaction import Redactor, is_secret_key, redact

FAKE_GOOGLE_TOKEN = "ya29." + "a0AfB_byC" * 5


def test_secret_keys_are_recognised_by_their_words() -> None:
    assert is_secret_key("OPENAI_API_KEY") and is_secret_key("refreshToken")
    assert not is_secret_key("prompt_tokens") and not is_secret_key("partition_key")


def test_redact_hides_every_credential_shape_and_keeps_the_rest() -> None:
    assert redact("no secrets here") == "no secrets here"
    url = "GET https://bob:pw@mlflow.example/api failed"
    assert redact(url) == "GET https://***@mlflow.example/api failed"
    assert redact("gs://b/o?X-Goog-Signature=abc123&alt=media") == "gs://b/o?X-Goog-Signature=***&alt=media"
    assert redact("Authorization: Bearer abc.def-ghi") == "Authorization: Bearer ***"
    assert redact(f"token was {FAKE_GOOGLE_TOKEN} here") == "token was [REDACTED] here"


def test_redactor_also_hides_the_exact_secrets_it_was_given() -> None:
    redactor = Redactor()
    redactor.add("s3cr3t-value")
    redactor.add("ab")  # too short to replace safely: ignored
    assert redactor("failed with s3cr3t-value at ab") == "failed with *** at ab"
