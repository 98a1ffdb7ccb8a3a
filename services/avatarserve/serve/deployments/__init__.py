"""The Ray Serve deployment classes, and only them: `StageReplica` / `VaeDecoderReplica` (stage.py: one per pipeline
stage), `GatewayDeployment` (gateway.py: the ingress), `SinkFrameCache` (cache.py). The ops page's deployment,
`OpsDashboard`, lives with the page in serve/ops/dashboard.py. serve/builder.py binds them into one application."""
