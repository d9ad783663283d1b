"""Generated gRPC stubs of the moecluster.v1 API (see proto/moecluster/v1/)."""
