{ pkgs, lib, config, ... }:
let
  name = "app";
in {
  services.redis = lib.mkDefault {
    enable = lib.mkForce true;
    port = lib.mkOverride 900 70000;
  };
  services.minio.enable = true;
  services.minio.buckets = [ "uploads" ];
  services.postgres = {
    enable = lib.mkDefault (true);
    port = "5432";
    initialScript = "CREATE DATABASE ${name};";
    initialDatabases = [ { name = "a\"b\\c"; } ];
  };
  env.QUOTED = "tab\there \${HOME} $${USER}";
  env.INDENTED = ''
    '''quoted'''
      ''${not} interpolated''\tend
  '';
  env.FROM_LET = name;
  processes.db.exec = "postgres -D ${config.env.DEVENV_STATE}/pg";
}
