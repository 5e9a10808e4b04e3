"""Operations around the data path: control plane, HTTP API, scheduler, S3 imports,
copy/export and delete-cache steps."""
