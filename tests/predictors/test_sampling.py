import pytest

from predictors.errors import InvalidInput
from predictors.sampling import DEFAULT_MAX_TOKENS, parse_parameters, to_sampling_params


def test_defaults_then_request_values_win():
    sp = to_sampling_params(
        parse_parameters({"temperature": 0.5, "top_k": 5}), {"temperature": 0.7, "top_p": 0.9}
    )
    assert sp.temperature == 0.5 and sp.top_k == 5 and sp.top_p == 0.9
    assert sp.max_tokens == DEFAULT_MAX_TOKENS


def test_transport_keys_are_ignored():
    assert parse_parameters({"binary_data_output": True, "max_tokens": 3}).max_tokens == 3


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"temprature": 0}, "parameters.temprature: unknown parameter"),
        ({"temperature": "hot"}, "parameters.temperature"),
        ({"max_tokens": 0}, "parameters.max_tokens"),
        ({"top_p": 1.5}, "parameters.top_p"),
        ({"stop": 5}, "parameters.stop"),
        ([1, 2], "parameters must be a JSON object"),
    ],
)
def test_bad_parameters_name_the_problem(raw, needle):
    with pytest.raises(InvalidInput) as err:
        parse_parameters(raw)
    assert needle in str(err.value)


def test_engine_side_validation_is_a_client_error():
    # Parameters pydantic accepts but vLLM's SamplingParams refuses: still the client's mistake.
    with pytest.raises(InvalidInput, match=r"^parameters: .*top_k"):
        to_sampling_params(parse_parameters({"top_k": -7}))


def test_streams_get_deltas_and_single_answers_the_final_output():
    from vllm.sampling_params import RequestOutputKind

    assert to_sampling_params(parse_parameters(None), stream=True).output_kind == RequestOutputKind.DELTA
    assert to_sampling_params(parse_parameters({})).output_kind == RequestOutputKind.FINAL_ONLY
