{ pkgs, lib, config, inputs, ... }:

{
  name = "fullstack";

  languages.javascript = {
    enable = true;
    package = pkgs.nodejs_20;
    npm.install.enable = true;
  };

  services = {
    postgres = {
      enable = true;
      listen_addresses = "*";
      initialDatabases = [{ name = "app"; user = "app"; pass = "p@ss:w/rd"; }];
    };
    redis.enable = true;
    rabbitmq = {
      enable = true;
      managementPlugin.enable = true;
    };
  };

  processes = {
    api.exec = "npm run api";
    ui.exec = ''
      npm run ui -- --port 3000
    '';
  };

  scripts.migrate.exec = "npx prisma migrate dev";

  enterTest = ''
    wait_for_port ${toString config.services.postgres.port}
    npm test
  '';
}
