"""The checked-in gRPC stubs are what the .proto files generate (regenerate with
`python -m moecluster.proto.generate`)."""

from __future__ import annotations

import pytest

pytest.importorskip("grpc_tools")

from moecluster.proto import generate  # noqa: E402


def test_checked_in_stubs_match_the_proto_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--check"]) == 0, capsys.readouterr().err


def test_stubs_describe_the_public_service() -> None:
    from moecluster.proto.v1 import generation_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "moecluster.v1.Generation"
    assert {m.name for m in service.methods} == {"Generate", "Abort", "ListModels", "ClusterStatus"}
    assert service.methods_by_name["Generate"].server_streaming
