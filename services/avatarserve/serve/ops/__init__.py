"""Operating the cluster: `metrics` (Prometheus metrics of stages and gateway), `dashboard` (the built-in ops page
and its deployment), `progress` (watching a deploy, naming a failed replica), `launcher` (`avatarserve up/down`)."""
